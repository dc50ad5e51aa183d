# Sourced by train_sd.sh and train_t5.sh after their settings: turns the settings into
# train_from_cached.py flags and starts it (through accelerate launch when accelerate has a config).
# The wrappers differ only in their settings; everything they do with them lives here. The recipe is
# the package's --preset PRESET; only the settings a user filled in are passed, so they override it
# and every other value stays the preset's.

# Paths in the settings are taken relative to where the wrapper was started, as a user expects.
CACHETRAIN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# the original scripts' allocator setting: fewer out-of-memory stops from fragmentation on CUDA
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

ARGS=(--copy_config "$0")
# a settings file from before presets sets no PRESET but fills in every value: it runs as it always did
[ -n "${PRESET:-}" ] && ARGS=(--preset "$PRESET" "${ARGS[@]}")
pass_if_set() {  # FLAG VALUE: FLAG VALUE, when VALUE is not empty
    [ -z "$2" ] || ARGS+=("$1" "$2")
}
pass_if_set --pretrained_model "${MODEL:-}"
pass_if_set --imgcache_suffix "${IMG_SUFFIX:-}"
pass_if_set --txtcache_suffix "${TXT_SUFFIX:-}"
pass_if_set --learning_rate "${LEARNING_RATE:-}"
pass_if_set --batch_size "${BATCH_SIZE:-}"
pass_if_set --gradient_accum "${GRADIENT_ACCUM:-}"
pass_if_set --max_steps "${MAX_STEPS:-}"
pass_if_set --save_steps "${SAVE_STEPS:-}"
pass_if_set --scheduler "${SCHEDULER:-}"
pass_if_set --warmup_steps "${WARMUP_STEPS:-}"
pass_if_set --optimizer "${OPTIMIZER:-}"
pass_if_set --sampler_steps "${SAMPLER_STEPS:-}"
pass_if_set --force_toklen "${FORCE_TOKLEN:-}"
case "${SNR_GAMMA:-}" in
    "") ;;
    off) ARGS+=(--no-use_snr) ;;
    *) ARGS+=(--use_snr --noise_gamma "$SNR_GAMMA") ;;
esac
case "${GRADIENT_CHECKPOINTING:-}" in
    "") ;;
    1) ARGS+=(--gradient_checkpointing) ;;
    *) ARGS+=(--no-gradient_checkpointing) ;;
esac
# DATA_DIRS: folders separated by spaces, or by "|" when a folder's path holds a space (no glob expansion)
if [[ "${DATA_DIRS:-}" == *"|"* ]]; then IFS='|' read -r -a DATA_DIR_LIST <<< "$DATA_DIRS"
else read -r -a DATA_DIR_LIST <<< "${DATA_DIRS:-}"; fi
for dir in "${DATA_DIR_LIST[@]}"; do [ -n "$dir" ] && ARGS+=(--train_data_dir "$dir"); done
[ "${#PROMPTS[@]}" -gt 0 ] && ARGS+=(--sample_prompt "${PROMPTS[@]}")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && ARGS+=($EXTRA_ARGS)

PYTHON="${PYTHON:-python3}"
[ -x "$CACHETRAIN_REPO/.venv/bin/python" ] && PYTHON="$CACHETRAIN_REPO/.venv/bin/python"

# OUTPUT_DIR left empty: a folder named from the settings (batch, accumulation, LR, schedule, steps, gamma)
if [ -z "${OUTPUT_DIR:-}" ]; then
    OUTPUT_DIR="$(PYTHONPATH="$CACHETRAIN_REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m cachetrain.train.run_name "${ARGS[@]}")" \
        || { echo "$0: could not name the output folder from the settings (see above); set OUTPUT_DIR" >&2; exit 2; }
fi
ARGS+=(--output_dir "$OUTPUT_DIR")

# "./train_sd.sh checkpoint": the running training of these settings saves a checkpoint after its next step
case "${1:-}" in
    "") ;;
    checkpoint)
        if [ ! -d "$OUTPUT_DIR" ]; then
            echo "$0 checkpoint: no training folder $OUTPUT_DIR (is a run of these settings started?)" >&2
            exit 2
        fi
        touch "$OUTPUT_DIR/trigger.checkpoint" || exit 2
        echo "Queuing a checkpoint for $OUTPUT_DIR"
        exit 0 ;;
    *)
        echo "$0: unknown argument '$1'; known: checkpoint" >&2
        exit 2 ;;
esac
ACCELERATE_CONFIG="${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml"
if [ -f "$ACCELERATE_CONFIG" ] && "$PYTHON" -c "import accelerate" 2>/dev/null; then
    exec "$PYTHON" -m accelerate.commands.launch "$CACHETRAIN_REPO/train_from_cached.py" "${ARGS[@]}"
else
    exec "$PYTHON" "$CACHETRAIN_REPO/train_from_cached.py" "${ARGS[@]}"
fi
