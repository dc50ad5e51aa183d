"""cachetrain: train Stable Diffusion 1.5-architecture UNets from pre-computed caches.

Layers, lowest first (a module imports only from layers below it):
  sidecar, config, tree, images          - files and flags, no models
  models, objective, optim, layers       - model loading and the numerics of one step
  loader, telemetry, sampling, checkpoint
  cache_build (image_cache, text_cache)  - the cache builders
  trainer                                - the training loop
  tiny                                   - tiny offline models and the synthetic dataset
"""

__version__ = "0.1.0"
