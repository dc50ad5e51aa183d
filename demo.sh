#!/usr/bin/env bash
# The whole SD1.5 path on the embedded tiny model, offline: set up, build the tiny model and the
# synthetic dataset, cache latents and text embeddings, train a few hundred steps, show the results.
#   ./demo.sh        the SD1.5 model (CLIP-L text, SD VAE)
#   ./demo.sh --t5   the SD1.5 UNet + SDXL VAE + T5 model (T5 text through a projection, SDXL VAE)
#   ./demo.sh --lora the SD1.5 demo, then a LoRA on its result for a shape it never saw (triangles);
#                    the compare page shows base vs base+LoRA
set -euo pipefail
cd "$(dirname "$0")"
MODE=sd
LORA=0
case "${1:-}" in
    "") ;;
    --t5) MODE=t5 ;;
    --lora) LORA=1 ;;
    *) echo "usage: $0 [--t5 | --lora]" >&2; exit 2 ;;
esac
START=$(date +%s)
./scripts/setup_env.sh
SETUP_DONE=$(date +%s)

export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
PY=.venv/bin/python
STEPS="${DEMO_STEPS:-300}"
PROMPTS="a red circle on a blue background|a yellow square on a black background"
# the SD1.5 demo also draws the other shape in each colour: the shape follows its word, not the colour
SD_PROMPTS="$PROMPTS|a yellow circle on a black background|a red square on a blue background"

if [ "$MODE" = sd ]; then
    DEMO="${DEMO_DIR:-demo_out}"
    echo "[demo] building the tiny SD1.5-shaped model and the synthetic shapes dataset in $DEMO/"
    rm -rf "$DEMO"
    $PY -m cachetrain.tiny model "$DEMO/tiny-sd" --trained_vae   # the committed VAE trained on the shapes
    # Two shapes, two shape colours, two backgrounds, each shape centred at one size: few enough
    # combinations, and nothing else to learn, for a model this small to draw them in 300 steps.
    $PY -m cachetrain.tiny data "$DEMO/data" --count 512 --shapes circle square --colours red yellow \
        --backgrounds blue black --centred

    echo "[demo] caching latents and caption embeddings"
    $PY create_img_sdvae.py --model "$DEMO/tiny-sd" --data_root "$DEMO/data" --resolution 64 --num_workers 2
    $PY create_clipl.py --model "$DEMO/tiny-sd" --data_root "$DEMO/data"

    # v-prediction with zero terminal SNR: the model learns to draw from pure noise, which an epsilon
    # model this small does not in 300 steps; caption dropout trains the unconditional that guidance uses.
    # The samples are drawn with the scheduler this saves in the checkpoints (DDIM, trailing timesteps).
    # No min-SNR weighting: for v-prediction it weighs a timestep min(SNR, 5) / (SNR + 1), next to nothing
    # at the noisiest ones, where sampling starts and a shape is laid out.
    SD_OBJECTIVE="--prediction_type v_prediction --zero_terminal_snr --caption_dropout 0.1 --guidance_scale 3"
    echo "[demo] training $STEPS steps"
    MODEL="$DEMO/tiny-sd" DATA_DIRS="$DEMO/data" OUTPUT_DIR="$DEMO/run" LEARNING_RATE=2e-3 BATCH_SIZE=16 \
    GRADIENT_ACCUM=1 MAX_STEPS="$STEPS" SAVE_STEPS=100 SCHEDULER=cosine WARMUP_STEPS=20 SNR_GAMMA=off \
    SAMPLER_STEPS=50 PROMPTS_OVERRIDE="$SD_PROMPTS" EXTRA_ARGS="--num_workers 1 --log_every 10 $SD_OBJECTIVE" \
    ./train_sd.sh
    PIPELINE_CLASS="a StableDiffusionPipeline folder"
else
    DEMO="${DEMO_DIR:-demo_out_t5}"
    echo "[demo] building the tiny SD1.5 UNet + SDXL VAE + T5 model and the synthetic shapes dataset in $DEMO/"
    rm -rf "$DEMO"
    $PY -m cachetrain.tiny t5model "$DEMO/tiny-t5"
    $PY -m cachetrain.tiny data "$DEMO/data" --count 512

    echo "[demo] caching SDXL VAE latents and T5 caption embeddings"
    $PY create_img_sdxl.py --model "$DEMO/tiny-t5" --data_root "$DEMO/data" --resolution 64 --num_workers 2
    $PY create_t5cache_768.py --model "$DEMO/tiny-t5" --data_root "$DEMO/data"

    echo "[demo] training $STEPS steps"
    MODEL="$DEMO/tiny-t5" DATA_DIRS="$DEMO/data" OUTPUT_DIR="$DEMO/run" LEARNING_RATE=1e-3 BATCH_SIZE=16 \
    GRADIENT_ACCUM=1 MAX_STEPS="$STEPS" SAVE_STEPS=100 SCHEDULER=cosine WARMUP_STEPS=20 SNR_GAMMA=5.0 \
    SAMPLER_STEPS=20 GRADIENT_CHECKPOINTING=0 PROMPTS_OVERRIDE="$PROMPTS" \
    EXTRA_ARGS="--num_workers 1 --log_every 10" ./train_t5.sh
    PIPELINE_CLASS="a StableDiffusionT5Pipeline folder; import cachetrain.t5 before loading it"
fi

END=$(date +%s)
echo
echo "[demo] done: set-up $((SETUP_DONE - START)) s, work $((END - SETUP_DONE)) s"
$PY -c 'import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}); events.Reload()
loss = events.Scalars("train/loss")
print(f"[demo] loss:         {loss[0].value:.4f} at step {loss[0].step} -> {loss[-1].value:.4f} at step {loss[-1].step}")' \
    "$DEMO/run/tensorboard"
echo "[demo] checkpoints:  $(ls -d "$DEMO"/run/checkpoint-* | tr '\n' ' ')"
echo "[demo] samples:      $(ls "$DEMO"/run/checkpoint-*/sample-*.png | tail -2 | tr '\n' ' ')"
if [ "$MODE" = sd ]; then
    # the first and the last checkpoint's samples, side by side (a page and one PNG per prompt row)
    LAST="$(printf %05d "$STEPS")"
    if [ -d "$DEMO/run/checkpoint-00100" ] && [ "$LAST" != 00100 ]; then
        for STEP in 00100 "$LAST"; do
            mkdir -p "$DEMO/compare/step-$STEP/samples"
            cp "$DEMO"/run/checkpoint-"$STEP"/sample-*.png "$DEMO/compare/step-$STEP/samples/"
        done
        $PY compare_imgdirs.py "$DEMO/compare/step-00100" "$DEMO/compare/step-$LAST" \
            --out "$DEMO/compare.html" --png "$DEMO/compare_png" 2>/dev/null
        echo "[demo] compare page: $DEMO/compare.html (PNG: $DEMO/compare_png/samples.png)"
    fi
fi
if [ "$LORA" = 1 ]; then
    # A concept the base never saw: triangles, in the base's colours. The LoRA trains on the base's
    # final model (its v-prediction scheduler comes with it); only the adapter's weights change. The
    # base's circles and squares beside the triangles keep it from drawing a triangle for every shape.
    LORA_STEPS="${DEMO_LORA_STEPS:-150}"
    LORA_PROMPTS=("a red triangle on a blue background" "a yellow triangle on a black background"
                  "a red circle on a blue background")
    echo "[demo] LoRA: triangles, a shape the base model never saw"
    $PY -m cachetrain.tiny data "$DEMO/lora_data" --count 384 --shapes triangle circle square --colours red yellow \
        --backgrounds blue black --centred
    $PY create_img_sdvae.py --model "$DEMO/tiny-sd" --data_root "$DEMO/lora_data" --resolution 64 --num_workers 2
    $PY create_clipl.py --model "$DEMO/tiny-sd" --data_root "$DEMO/lora_data"
    LORA_START=$(date +%s)
    $PY train_from_cached.py --pretrained_model "$DEMO/run" --train_data_dir "$DEMO/lora_data" \
        --output_dir "$DEMO/lora_run" --lora_type lora --lora_rank 16 --lora_targets attention feedforward conv \
        --learning_rate 3e-3 --batch_size 16 --max_steps "$LORA_STEPS" --save_steps "$LORA_STEPS" \
        --scheduler cosine --warmup_steps 10 --caption_dropout 0.1 --guidance_scale 3 --sampler_steps 50 \
        --sample_prompt "${LORA_PROMPTS[@]}" --save_kohya_lora --num_workers 1 --log_every 10
    echo "[demo] LoRA trained in $(( $(date +%s) - LORA_START )) s"
    # the same prompts and seeds from the base alone, beside the LoRA run's samples
    rm -rf "$DEMO/compare_lora"
    $PY sample_images.py "$DEMO/run" --out "$DEMO/compare_lora/base/samples" --steps 50 --guidance 3 \
        --device cpu --prompt "${LORA_PROMPTS[0]}" --prompt "${LORA_PROMPTS[1]}" --prompt "${LORA_PROMPTS[2]}"
    mkdir -p "$DEMO/compare_lora/base+lora/samples"
    cp "$DEMO"/lora_run/checkpoint-"$(printf %05d "$LORA_STEPS")"/sample-*.png "$DEMO/compare_lora/base+lora/samples/"
    $PY compare_imgdirs.py "$DEMO/compare_lora/base" "$DEMO/compare_lora/base+lora" \
        --out "$DEMO/compare_lora.html" --png "$DEMO/compare_lora_png" 2>/dev/null
    echo "[demo] LoRA:         $DEMO/lora_run/pytorch_lora_weights.safetensors (diffusers), lora_kohya.safetensors (A1111/ComfyUI)"
    echo "[demo] compare page: $DEMO/compare_lora.html (base vs base+LoRA; PNG: $DEMO/compare_lora_png/samples.png)"
fi
echo "[demo] final model:  $DEMO/run ($PIPELINE_CLASS)"
echo "[demo] tensorboard:  .venv/bin/tensorboard --logdir $DEMO/run/tensorboard"
