"""cachetrain: train Stable Diffusion 1.5-architecture UNets from pre-computed caches.

The folders are the stages, in the order data flows (a stage imports only stages before it):

  (root)   the contracts every stage shares: sidecar files (``sidecar``) and whether one is current for
           its source (``freshness``, ``fresh_digests``), walking a data tree (``tree``),
           the names inside a run folder (``checkpoint_layout``), atomic writes, the CLI helpers (``cli``),
           reads with a time bound (``bounded_read``), copies by reflink (``reflink``), the data index of a
           tree (``data_index`` keeps it current, ``index_table`` its arrays and file, ``indexed_pairs``),
           the shard manifest that cachetrain-pack writes and a run reads (``shard_manifest``)
  models/  loading and building pipelines, model file formats and export, drawing a sample
  cache/   images and captions -> sidecars                       (create_img_*.py, create_*cache*.py)
  train/   sidecar pairs -> a trained UNet and its checkpoints   (train_from_cached.py)
  sample/  samples drawn outside training                        (sample_images.py)
  view/    comparing runs, inspecting caches                     (compare_imgdirs.py, cachetrain-inspect)
  tiny/    offline tiny models and synthetic data                (the demo and the tests)

``commands`` holds the console commands (one per script) and imports each stage only when called.
``cachetrain.t5``, ``cachetrain.flow``, ``cachetrain.export`` and ``cachetrain.inspect`` are kept import
paths (saved checkpoints and ``python -m`` name them) for modules that now live in a stage.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes, when installed (for --optimizer adamw8), warns at import on some CPUs that an optional
# 4-bit inference kernel is missing and asks for a package we never use; diffusers imports it always
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _TorchvisionFallbackNote(logging.Filter):
    """Drops transformers' note that CLIPImageProcessor / SiglipImageProcessor fall back to their Pillow
    versions because torchvision is not installed: diffusers' pipeline modules import both, no script here
    processes images through them, and torchvision is not a dependency. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision (not installed); falling back to" in message
                    and message.startswith(("`CLIPImageProcessor`", "`SiglipImageProcessor`")))


# The note is logged by this module's logger, before diffusers hands control back to us: filtering at the
# source logger keeps transformers' own handlers and verbosity as the user set them
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNote())
