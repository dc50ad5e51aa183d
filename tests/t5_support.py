"""Fixtures of the T5 tests: the tiny T5 model and the synthetic data cached through it.

Imported by each test_t5_*.py under tests/ (so each of those modules builds them once).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cachetrain.sidecar import SDXL_VAE_SUFFIX, T5_SUFFIX


def cache_args(model: Path, root: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data_root", str(root), "--num_workers", "0", "--no_progress",
            "--save_dtype", "float32", *extra]


def cache_sdxl_latents(model: Path, root: Path) -> int:
    """What create_img_sdxl.py does: the shared image cache with the .img_sdxl defaults."""
    from cachetrain.cache.image_cache import ImageScriptDefaults, main

    defaults = ImageScriptDefaults(model=str(model), out_suffix=SDXL_VAE_SUFFIX, description="SDXL VAE latents")
    return main(cache_args(model, root, "--resolution", "64"), defaults)


def cache_t5_embeddings(model: Path, root: Path, *extra: str) -> int:
    from cachetrain.cache.t5_cache import main

    return main(cache_args(model, root, "--batch_size", "8", *extra))


@pytest.fixture(scope="module")
def tiny_t5_model(tmp_path_factory) -> Path:
    from cachetrain.tiny.models import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5") / "model", seed=0)


@pytest.fixture(scope="module")
def t5_cached_template(tiny_t5_model, _shapes_template, tmp_path_factory) -> Path:
    """The 48 synthetic images with .img_sdxl and .txt_t5cache sidecars (read-only; copy to change)."""
    root = tmp_path_factory.mktemp("t5-cached") / "data"
    shutil.copytree(_shapes_template, root)
    assert cache_sdxl_latents(tiny_t5_model, root) == 0
    assert cache_t5_embeddings(tiny_t5_model, root) == 0
    return root


def captions_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.txt"))


def text_sidecar(caption: Path) -> Path:
    return caption.with_suffix(T5_SUFFIX)


