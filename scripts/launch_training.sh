# Sourced by train_sd.sh and train_t5.sh after their settings: turns the settings into
# train_from_cached.py flags and starts it (through accelerate launch when accelerate has a config).
# The wrappers differ only in their settings; everything they do with them lives here.

# Paths in the settings are taken relative to where the wrapper was started, as a user expects.
CACHETRAIN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ARGS=(--pretrained_model "$MODEL" --output_dir "$OUTPUT_DIR" --copy_config "$0"
      --imgcache_suffix "$IMG_SUFFIX" --txtcache_suffix "$TXT_SUFFIX"
      --learning_rate "$LEARNING_RATE" --batch_size "$BATCH_SIZE" --gradient_accum "$GRADIENT_ACCUM"
      --max_steps "$MAX_STEPS" --save_steps "$SAVE_STEPS" --scheduler "$SCHEDULER"
      --warmup_steps "$WARMUP_STEPS" --optimizer "$OPTIMIZER" --sampler_steps "$SAMPLER_STEPS"
      --sample_prompt "${PROMPTS[@]}")
for dir in $DATA_DIRS; do ARGS+=(--train_data_dir "$dir"); done
[ -n "${SNR_GAMMA:-}" ] && ARGS+=(--use_snr --noise_gamma "$SNR_GAMMA")
[ -n "${FORCE_TOKLEN:-}" ] && ARGS+=(--force_toklen "$FORCE_TOKLEN")
[ "${GRADIENT_CHECKPOINTING:-0}" = 1 ] && ARGS+=(--gradient_checkpointing)
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && ARGS+=($EXTRA_ARGS)

PYTHON="${PYTHON:-python3}"
[ -x "$CACHETRAIN_REPO/.venv/bin/python" ] && PYTHON="$CACHETRAIN_REPO/.venv/bin/python"
ACCELERATE_CONFIG="${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml"
if [ -f "$ACCELERATE_CONFIG" ] && "$PYTHON" -c "import accelerate" 2>/dev/null; then
    exec "$PYTHON" -m accelerate.commands.launch "$CACHETRAIN_REPO/train_from_cached.py" "${ARGS[@]}"
else
    exec "$PYTHON" "$CACHETRAIN_REPO/train_from_cached.py" "${ARGS[@]}"
fi
