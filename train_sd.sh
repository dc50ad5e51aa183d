#!/usr/bin/env bash
# Train an SD1.5 UNet from cached sidecars. The variables below are your saved settings: edit them
# (or override any one from the environment, e.g. MAX_STEPS=2000 ./train_sd.sh). This file is copied
# into OUTPUT_DIR at start, so every run keeps the settings it ran with.
set -euo pipefail

MODEL="${MODEL:-runwayml/stable-diffusion-v1-5}"        # diffusers folder or hub id
DATA_DIRS="${DATA_DIRS:-/data/images}"                    # one or more folders, space-separated
OUTPUT_DIR="${OUTPUT_DIR:-output/sd15}"
IMG_SUFFIX="${IMG_SUFFIX:-.img_sdvae}"
TXT_SUFFIX="${TXT_SUFFIX:-.txt_clipl}"
LEARNING_RATE="${LEARNING_RATE:-1e-5}"
BATCH_SIZE="${BATCH_SIZE:-16}"
GRADIENT_ACCUM="${GRADIENT_ACCUM:-4}"
MAX_STEPS="${MAX_STEPS:-10000}"                         # optimizer steps, or Ne for N epochs
SAVE_STEPS="${SAVE_STEPS:-1000}"
SCHEDULER="${SCHEDULER:-cosine}"
WARMUP_STEPS="${WARMUP_STEPS:-100}"
SNR_GAMMA="${SNR_GAMMA:-5.0}"                           # empty disables min-SNR weighting
OPTIMIZER="${OPTIMIZER:-adamw}"
SAMPLER_STEPS="${SAMPLER_STEPS:-30}"
PROMPTS=("a photo of a cat" "a watercolor landscape")
[ -n "${PROMPTS_OVERRIDE:-}" ] && IFS='|' read -r -a PROMPTS <<< "$PROMPTS_OVERRIDE"
EXTRA_ARGS="${EXTRA_ARGS:-}"                            # any other train_from_cached.py flags

cd "$(dirname "$0")"
mkdir -p "$OUTPUT_DIR"
cp "$0" "$OUTPUT_DIR/"

ARGS=(--pretrained_model "$MODEL" --output_dir "$OUTPUT_DIR" --copy_config "$0"
      --imgcache_suffix "$IMG_SUFFIX" --txtcache_suffix "$TXT_SUFFIX"
      --learning_rate "$LEARNING_RATE" --batch_size "$BATCH_SIZE" --gradient_accum "$GRADIENT_ACCUM"
      --max_steps "$MAX_STEPS" --save_steps "$SAVE_STEPS" --scheduler "$SCHEDULER"
      --warmup_steps "$WARMUP_STEPS" --optimizer "$OPTIMIZER" --sampler_steps "$SAMPLER_STEPS"
      --sample_prompt "${PROMPTS[@]}")
for dir in $DATA_DIRS; do ARGS+=(--train_data_dir "$dir"); done
[ -n "$SNR_GAMMA" ] && ARGS+=(--use_snr --noise_gamma "$SNR_GAMMA")
# shellcheck disable=SC2206
[ -n "$EXTRA_ARGS" ] && ARGS+=($EXTRA_ARGS)

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
ACCELERATE_CONFIG="${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml"
if [ -f "$ACCELERATE_CONFIG" ] && "$PYTHON" -c "import accelerate" 2>/dev/null; then
    exec "$PYTHON" -m accelerate.commands.launch train_from_cached.py "${ARGS[@]}"
else
    exec "$PYTHON" train_from_cached.py "${ARGS[@]}"
fi
