"""The console commands ``pip install`` puts on PATH, one function per top-level script.

Each top-level script (``train_from_cached.py`` ...) and its console command call the same function
here, so an installed command and a script run from a checkout behave alike. Heavy imports happen
inside each function: ``--help`` and ``--version`` answer without loading a model library first.
"""

from __future__ import annotations

from .cli import require_dependencies

require_dependencies()  # before torch is imported: run outside the environment, one line, not a traceback

from .models import loading as models  # noqa: E402
from .cache.image_cache import ImageScriptDefaults  # noqa: E402
from .sidecar import SD_VAE_SUFFIX, SDXL_VAE_SUFFIX  # noqa: E402

SD_VAE_DEFAULTS = ImageScriptDefaults(
    model=models.SD15_MODEL_ID,
    out_suffix=SD_VAE_SUFFIX,
    description="Cache SD1.5 VAE latents of every image under the data roots.",
)
SDXL_VAE_DEFAULTS = ImageScriptDefaults(
    model=models.SDXL_MODEL_ID,
    out_suffix=SDXL_VAE_SUFFIX,
    description="Cache SDXL VAE latents of every image under the data roots.",
)


def create_img_sdvae(argv: list[str] | None = None) -> int:
    from .cache.image_cache import main

    return main(argv, SD_VAE_DEFAULTS)


def create_img_sdxl(argv: list[str] | None = None) -> int:
    from .cache.image_cache import main

    return main(argv, SDXL_VAE_DEFAULTS)


def create_clipl(argv: list[str] | None = None) -> int:
    from .cache.text_cache import main_clip

    return main_clip(argv)


def pack(argv: list[str] | None = None) -> int:
    from .cache.pack import main

    return main(argv)


def create_t5cache_768(argv: list[str] | None = None) -> int:
    from .cache.t5_cache import main

    return main(argv)


def train_from_cached(argv: list[str] | None = None) -> int:
    from .train.trainer import main

    return main(argv)


def compare_imgdirs(argv: list[str] | None = None) -> int:
    from .view.compare import main

    return main(argv)


def assemble_t5_pipeline(argv: list[str] | None = None) -> int:
    from .models.assemble import main

    return main(argv)


def sample_images(argv: list[str] | None = None) -> int:
    from .sample.sampler_cli import main

    return main(argv)


def export_single_file(argv: list[str] | None = None) -> int:
    from .models.export import main

    return main(argv)


def inspect(argv: list[str] | None = None) -> int:
    from .view.inspect import main

    return main(argv)


def data_index(argv: list[str] | None = None) -> int:
    from .index_command import main

    return main(argv)


def tiny(argv: list[str] | None = None) -> int:
    from .tiny.models import main

    main(argv)
    return 0


def lora(argv: list[str] | None = None) -> int:
    from .models.lora_tools import main

    return main(argv)
