"""cachetrain: train Stable Diffusion 1.5-architecture UNets from pre-computed caches.

Layers, lowest first (a module imports only from layers below it):
  sidecar, tree, images, prompts         - files, names, prompt files; no models; the original SD
  ldm_layout                               single-file layout (key names, prefixes, markers)
  layers, presets, config                - parameter selections; named recipes (--preset); the trainer's flags
  text_encoding, objective, optim,       - prompt -> conditioning rules (CLIP, T5, the pad rule), one
  sampling, training_state,                step's numerics, samples, a checkpoint's training state (and what a
  checkpoint, ema                          resume must share), checkpoints, the EMA
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
  processes                              - the accelerator, the launch check, what a run's processes agree on
  shards, cache_summary, cache_writer,   - the cache builders: each process's share of the files, what a build
  cache_plan, cache_build                  reports, writing sidecars, what a build must do, the engine and its flags;
  image_cache, text_cache, t5_cache        the builders (in this order, each importing only those before it)
  inspect, compare, assemble             - looking at caches and runs; building a T5 pipeline from parts
  trainer                                - the training loop
  folder_sampler, sampler_cli            - sample_images.py: samples of one folder; a run's checkpoints sampled by
                                           another process (--watch) and the command line
  shapes, tiny                           - the synthetic dataset; tiny offline models (and the demo VAE's training)
  commands                               - the console commands, one per top-level script
"""

import logging

__version__ = "0.1.0"

# bitsandbytes, when installed (for --optimizer adamw8), warns at import on some CPUs that an optional
# 4-bit inference kernel is missing and asks for a package we never use; diffusers imports it always
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
