#!/usr/bin/env bash
# The whole SD1.5 path on the embedded tiny model, offline: set up, build the tiny model and the
# synthetic dataset, cache latents and text embeddings, train a few hundred steps, show the results.
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
./scripts/setup_env.sh
SETUP_DONE=$(date +%s)

export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
PY=.venv/bin/python
DEMO="${DEMO_DIR:-demo_out}"
STEPS="${DEMO_STEPS:-300}"

echo "[demo] building the tiny SD1.5-shaped model and the synthetic shapes dataset in $DEMO/"
rm -rf "$DEMO"
$PY -m cachetrain.tiny model "$DEMO/tiny-sd"
$PY -m cachetrain.tiny data "$DEMO/data" --count 512

echo "[demo] caching latents and caption embeddings"
$PY create_img_sdvae.py --model "$DEMO/tiny-sd" --data_root "$DEMO/data" --resolution 64 --num_workers 2
$PY create_clipl.py --model "$DEMO/tiny-sd" --data_root "$DEMO/data"

echo "[demo] training $STEPS steps"
MODEL="$DEMO/tiny-sd" DATA_DIRS="$DEMO/data" OUTPUT_DIR="$DEMO/run" LEARNING_RATE=1e-3 BATCH_SIZE=16 \
GRADIENT_ACCUM=1 MAX_STEPS="$STEPS" SAVE_STEPS=100 SCHEDULER=cosine WARMUP_STEPS=20 SNR_GAMMA=5.0 \
SAMPLER_STEPS=20 PROMPTS_OVERRIDE="a red circle on a blue background|a yellow square on a black background" \
EXTRA_ARGS="--num_workers 1 --log_every 10" ./train_sd.sh

END=$(date +%s)
echo
echo "[demo] done: set-up $((SETUP_DONE - START)) s, work $((END - SETUP_DONE)) s"
echo "[demo] checkpoints:  $(ls -d "$DEMO"/run/checkpoint-* | tr '\n' ' ')"
echo "[demo] samples:      $(ls "$DEMO"/run/checkpoint-*/sample-*.png | tail -2 | tr '\n' ' ')"
echo "[demo] final model:  $DEMO/run (a StableDiffusionPipeline folder)"
echo "[demo] tensorboard:  .venv/bin/tensorboard --logdir $DEMO/run/tensorboard"
