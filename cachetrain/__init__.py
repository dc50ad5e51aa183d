"""cachetrain: train Stable Diffusion 1.5-architecture UNets from pre-computed caches.

Layers, lowest first (a module imports only from layers below it):
  sidecar, tree, images, config, prompts - files, names, flags, prompt files; no models; the original SD
  ldm_layout                               single-file layout (key names, prefixes, markers)
  text_encoding, objective, optim,       - prompt -> conditioning rules (CLIP, T5, the pad rule), one
  layers, sampling, training_state,        step's numerics, parameter selections, samples, a checkpoint's
  checkpoint, ema                          training state (and what a resume must share), checkpoints, the EMA
  flow                                     (with them) a flow scheduler as SD pipelines drive it; the flow pipeline
  pipeline_code                          - the code a hub-style folder carries: checked, run when trusted, put back
  t5, models                             - the SD1.5 + T5 pipeline; loading models from a hub id, folder or single file
  export                                 - a pipeline folder as one single-file checkpoint (A1111 / ComfyUI)
  loader, telemetry, step                - sidecar pairs -> batches; metrics; one training step's device work
  bad_data                               - what every pair of a run must be; the ledger of bad pairs passed over
  fixed_embeddings, validation, run_data - embeddings read once; held-out pairs and val/loss; the run's pairs
  start_checks, frozen_parts,            - refused before step 1; the parts that do not train, around the UNet;
  checkpoint_writer, sample_drawer         writing checkpoints; drawing samples
  run_dir, save_policy                   - the run folder's small files, which checkpoint to resume, exit statuses;
                                           when a save is due and what failed saves mean
  shards, cache_build -> image_cache, text_cache, t5_cache   - the cache builders and their shares of the files
  inspect, compare, assemble             - looking at caches and runs; building a T5 pipeline from parts
  trainer                                - the training loop
  sampler_cli                            - sample_images.py: a run's checkpoints sampled by another process
  tiny                                   - tiny offline models and the synthetic dataset (and the demo VAE's training)
  commands                               - the console commands, one per top-level script
"""

import logging

__version__ = "0.1.0"

# bitsandbytes, when installed (for --optimizer adamw8), warns at import on some CPUs that an optional
# 4-bit inference kernel is missing and asks for a package we never use; diffusers imports it always
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
