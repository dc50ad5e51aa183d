#!/usr/bin/env bash
# Train an SD1.5 UNet from cached sidecars. The variables below are your saved settings: edit them
# (or override any one from the environment, e.g. MAX_STEPS=2000 ./train_sd.sh). This file is copied
# into OUTPUT_DIR at start, so every run keeps the settings it ran with. scripts/launch_training.sh
# turns the settings into train_from_cached.py flags.
#
# The recipe comes from the package's preset sd15 (see: train_from_cached.py --preset sd15 --help):
# a variable left empty passes nothing and the preset's value (in its comment) applies; set one to
# override it, e.g. LEARNING_RATE="${LEARNING_RATE:-2e-5}".
# "./train_sd.sh checkpoint" while it trains: save a checkpoint after the next step (touches OUTPUT_DIR/trigger.checkpoint).
set -euo pipefail

PRESET="${PRESET:-sd15}"
MODEL="${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"        # diffusers folder or hub id
DATA_DIRS="${DATA_DIRS:-/data/images}"                    # one or more folders, space-separated ("|" if a path has a space)
OUTPUT_DIR="${OUTPUT_DIR:-}"                              # empty: named from the settings, e.g. sd15_b16a4_1e-05_cosine10000g5
IMG_SUFFIX="${IMG_SUFFIX:-}"                              # preset: .img_sdvae
TXT_SUFFIX="${TXT_SUFFIX:-}"                              # preset: .txt_clipl
LEARNING_RATE="${LEARNING_RATE:-}"                        # preset: 1e-05
BATCH_SIZE="${BATCH_SIZE:-}"                              # preset: 16
GRADIENT_ACCUM="${GRADIENT_ACCUM:-}"                      # preset: 4
MAX_STEPS="${MAX_STEPS:-}"                                # preset: 10000 (optimizer steps, or Ne for N epochs)
SAVE_STEPS="${SAVE_STEPS:-}"                              # preset: 1000
SCHEDULER="${SCHEDULER:-}"                                # preset: cosine
WARMUP_STEPS="${WARMUP_STEPS:-}"                          # preset: 100
SNR_GAMMA="${SNR_GAMMA:-}"                                # preset: 5.0 (min-SNR weighting on); off: no min-SNR weighting
OPTIMIZER="${OPTIMIZER:-}"                                # preset: adamw
SAMPLER_STEPS="${SAMPLER_STEPS:-}"                        # preset: 30
PROMPTS=("a photo of a cat" "a watercolor landscape")
[ -n "${PROMPTS_OVERRIDE:-}" ] && IFS='|' read -r -a PROMPTS <<< "$PROMPTS_OVERRIDE"
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-}"      # preset: 0 (1: recompute activations to save memory)
EXTRA_ARGS="${EXTRA_ARGS:-}"                              # any other train_from_cached.py flags

# A copy of this file kept elsewhere finds cachetrain through CACHETRAIN_HOME.
source "${CACHETRAIN_HOME:-$(dirname "$0")}/scripts/launch_training.sh"
