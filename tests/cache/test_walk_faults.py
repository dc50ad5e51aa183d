"""Files that never answer and links that lead round: a FIFO named like a sidecar (the stand-in for a network or
FUSE file whose read never returns) and a loop of two links named like an image or a sidecar. The cache scripts,
the inspector and the trainer walk past them, name each one, and finish; no read blocks and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cachetrain import sidecar

from tests.conftest import CACHED_RESOLUTION, REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(*command: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # a hang fails the test here instead of holding it forever


def _plant_faults(root: Path) -> tuple[Path, Path, list[Path]]:
    """A FIFO in place of one image's latent, and two loops of links: one named like images, one like latents."""
    first_image = sorted(root.rglob("*.jpg"))[0]
    fifo = first_image.with_suffix(".img_sdvae")
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    folder = first_image.parent
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("ring_b.img_sdvae", folder / "ring_a.img_sdvae")
    os.symlink("ring_a.img_sdvae", folder / "ring_b.img_sdvae")
    loops = [folder / name for name in ("loop_a.jpg", "loop_b.jpg", "ring_a.img_sdvae", "ring_b.img_sdvae")]
    return first_image, fifo, loops


def test_the_image_cache_script_replaces_a_fifo_sidecar_and_names_link_loops_instead_of_hanging(cached_dataset,
                                                                                                 tiny_sd_model):
    image, fifo, loops = _plant_faults(cached_dataset)
    done = _run(str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model), "--data_root",
                str(cached_dataset), "--resolution", str(CACHED_RESOLUTION), "--num_workers", "0", "--no_progress",
                "--save_dtype", "float32")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    for loop in loops:
        assert f"left out {loop}: Too many levels of symbolic links" in done.stderr
    # the FIFO is no sidecar: read without blocking, found unreadable, rebuilt as a real one in its place
    assert fifo.is_file() and sidecar.read_sidecar(fifo, "latent", ndim=3).shape[0] == 4
    assert all(loop.is_symlink() for loop in loops)  # what is not ours is left alone


def test_the_inspector_names_a_fifo_and_link_loops_and_reports_the_rest(cached_dataset):
    _image, fifo, loops = _plant_faults(cached_dataset)
    done = _run("-m", "cachetrain.inspect", str(cached_dataset), "--no_progress", timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"left out {fifo}: not a regular file (a named pipe (FIFO))" in done.stderr
    for loop in loops:
        assert f"left out {loop}: Too many levels of symbolic links" in done.stderr


def test_the_trainer_trains_past_a_fifo_sidecar_and_link_loops_naming_them(cached_dataset, tiny_sd_model, tmp_path):
    _image, fifo, loops = _plant_faults(cached_dataset)
    output = tmp_path / "run"
    done = _run(str(REPO_ROOT / "train_from_cached.py"), "--pretrained_model", str(tiny_sd_model),
                "--train_data_dir", str(cached_dataset), "--output_dir", str(output), "--num_workers", "0",
                "--no_progress", "--batch_size", "4", "--max_steps", "2", "--save_steps", "0")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"left out {fifo}: not a regular file (a named pipe (FIFO))" in done.stderr
    assert f"left out {loops[2]}: Too many levels of symbolic links" in done.stderr
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
