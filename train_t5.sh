#!/usr/bin/env bash
# Train the SD1.5 UNet of an SD1.5 + SDXL VAE + T5 model from cached sidecars (x.img_sdxl latents,
# x.txt_t5cache caption embeddings). The variables below are your saved settings: edit them (or
# override any one from the environment, e.g. MAX_STEPS=2000 ./train_t5.sh). This file is copied
# into OUTPUT_DIR at start, so every run keeps the settings it ran with.
#
# The recipe comes from the package's preset t5 (see: train_from_cached.py --preset t5 --help):
# a variable left empty passes nothing and the preset's value (in its comment) applies; set one to
# override it, e.g. BATCH_SIZE="${BATCH_SIZE:-32}".
#
# Before training: build the model folder (assemble_t5_pipeline.py), then cache with the same folder:
#   create_img_sdxl.py --model MODEL ...   and   create_t5cache_768.py --model MODEL ...
# "./train_t5.sh checkpoint" while it trains: save a checkpoint after the next step (touches OUTPUT_DIR/trigger.checkpoint).
set -euo pipefail

PRESET="${PRESET:-t5}"
MODEL="${MODEL:-models/sd15-sdxlvae-t5}"                 # a T5 pipeline folder (or hub id)
DATA_DIRS="${DATA_DIRS:-/data/images}"                    # one or more folders, space-separated ("|" if a path has a space)
OUTPUT_DIR="${OUTPUT_DIR:-}"                              # empty: named from the settings, e.g. t5_b64a1_1e-05_cosine10000g5
IMG_SUFFIX="${IMG_SUFFIX:-}"                              # preset: .img_sdxl (SDXL VAE latents)
TXT_SUFFIX="${TXT_SUFFIX:-}"                              # preset: .txt_t5cache (T5 + projection embeddings, real tokens only)
LEARNING_RATE="${LEARNING_RATE:-}"                        # preset: 1e-05
BATCH_SIZE="${BATCH_SIZE:-}"                              # preset: 64 (per process)
GRADIENT_ACCUM="${GRADIENT_ACCUM:-}"                      # preset: 1 (effective batch = BATCH_SIZE x GRADIENT_ACCUM x GPUs)
MAX_STEPS="${MAX_STEPS:-}"                                # preset: 10000 (optimizer steps, or Ne for N epochs)
SAVE_STEPS="${SAVE_STEPS:-}"                              # preset: 1000
SCHEDULER="${SCHEDULER:-}"                                # preset: cosine
WARMUP_STEPS="${WARMUP_STEPS:-}"                          # preset: 100
SNR_GAMMA="${SNR_GAMMA:-}"                                # preset: 5.0 (min-SNR weighting on); off: no min-SNR weighting
OPTIMIZER="${OPTIMIZER:-}"                                # preset: adamw
SAMPLER_STEPS="${SAMPLER_STEPS:-}"                        # preset: 30
FORCE_TOKLEN="${FORCE_TOKLEN:-}"                          # N: pad/truncate every caption to N tokens; empty: pad per batch
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-}"      # preset: 1 (recompute activations: batch 64 fits in memory); 0: off
PROMPTS=("a photo of a cat sitting on a windowsill" "a watercolor landscape with mountains and a lake")
[ -n "${PROMPTS_OVERRIDE:-}" ] && IFS='|' read -r -a PROMPTS <<< "$PROMPTS_OVERRIDE"
EXTRA_ARGS="${EXTRA_ARGS:-}"                              # any other train_from_cached.py flags

# A copy of this file kept elsewhere finds cachetrain through CACHETRAIN_HOME.
source "${CACHETRAIN_HOME:-$(dirname "$0")}/scripts/launch_training.sh"
