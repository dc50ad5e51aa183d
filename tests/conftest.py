"""Shared fixtures: the tiny SD1.5-shaped model and the synthetic dataset, built once per session.

Everything is offline: HF_HUB_OFFLINE is set and the hub cache points into a temporary folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The processes the tests start put their temporaries in one folder of the run, removed at its end
# (torchrun leaves torchelastic_* folders behind). The first process (pytest, or xdist's controller)
# makes it; its workers inherit it, and a path under it stays short (chromium's socket path has a limit).
if "CACHETRAIN_TESTS_TMPDIR" not in os.environ:
    os.environ["CACHETRAIN_TESTS_TMPDIR"] = tempfile.mkdtemp(prefix="cachetrain-tests-")
    atexit.register(shutil.rmtree, os.environ["CACHETRAIN_TESTS_TMPDIR"], ignore_errors=True)
os.environ["TMPDIR"] = os.environ["CACHETRAIN_TESTS_TMPDIR"]
_HF_HOME = tempfile.mkdtemp(prefix="cachetrain-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # each process that imports this removes its own
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_HOME, "modules")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# bitsandbytes (--optimizer adamw8) is installed beside site-packages, not in it (scripts/setup_env.sh):
# where it is importable, every process that imports diffusers or peft imports it, 2 s of each script
# start. This process, where the adamw8 tests run, has it; a test that starts a process gives it this path.
OPTIONAL_PACKAGES = Path(sys.prefix) / "optional-packages"
if OPTIONAL_PACKAGES.is_dir():
    sys.path.append(str(OPTIONAL_PACKAGES))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: torch's default of 2 threads collapses under contention

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"


def pytest_collection_modifyitems(items):
    """Files holding a slow test run first, each file's tests in their order: with several workers
    (run_tests.sh gives each worker whole files) the long files then do not start last and run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory) -> Path:
    from cachetrain.tiny.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def _shapes_template(tmp_path_factory) -> Path:
    from cachetrain.tiny.models import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes-template") / "data"
    make_shapes_dataset(root, count=48, seed=1)
    return root


@pytest.fixture
def shapes_dataset(_shapes_template, tmp_path) -> Path:
    """A fresh copy of 48 synthetic images + captions (4 subfolders) that a test may change."""
    root = tmp_path / "data"
    shutil.copytree(_shapes_template, root)
    return root


# The image side the shared cached dataset is cached at for the tiny model, whose VAE downsamples 4x: 8x8
# latents, a third less CPU than the images' own 64 px over the hundreds of short runs the suite trains on
# it. A test that caches that dataset again, or builds latents to mix into it, uses these.
CACHED_RESOLUTION = 32
CACHED_LATENT_SHAPE = (4, CACHED_RESOLUTION // 4, CACHED_RESOLUTION // 4)


def cache_shapes(model: Path, template: Path, root: Path, resolution: int = CACHED_RESOLUTION) -> Path:
    """A copy of the synthetic images at ``root`` with fp32 .img_sdvae (at ``resolution``) and .txt_clipl
    sidecars from ``model``."""
    from cachetrain.commands import create_clipl, create_img_sdvae

    shutil.copytree(template, root)
    common = ["--model", str(model), "--data_root", str(root), "--num_workers", "0", "--no_progress",
              "--save_dtype", "float32"]
    assert create_img_sdvae(common + ["--resolution", str(resolution)]) == 0
    assert create_clipl(common) == 0
    return root


@pytest.fixture(scope="session")
def _cached_template(tiny_sd_model, _shapes_template, tmp_path_factory) -> Path:
    return cache_shapes(tiny_sd_model, _shapes_template, tmp_path_factory.mktemp("cached-template") / "data")


@pytest.fixture
def cached_dataset(_cached_template, tmp_path) -> Path:
    """The synthetic dataset with .img_sdvae and .txt_clipl sidecars from the tiny model (a fresh copy)."""
    root = tmp_path / "cached"
    shutil.copytree(_cached_template, root)
    return root


from tests.t5_support import t5_cached_template, tiny_t5_model  # noqa: E402,F401  (fixtures for the T5 tests)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
