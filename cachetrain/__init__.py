"""cachetrain: train Stable Diffusion 1.5-architecture UNets from pre-computed caches.

Layers, lowest first (a module imports only from layers below it):
  sidecar, config, tree, images          - files and flags, no models
  text_encoding                          - prompt -> UNet conditioning rules (CLIP, T5, the pad rule)
  models, t5, objective, optim, layers   - model loading (t5: the SD1.5 + T5 pipeline) and one step's numerics
  loader, telemetry, sampling, checkpoint
  cache_build (image_cache, text_cache, t5_cache), assemble  - the cache builders, T5 pipeline assembly
  trainer                                - the training loop
  tiny                                   - tiny offline models and the synthetic dataset
"""

__version__ = "0.1.0"
