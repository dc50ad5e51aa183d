"""The final model's files: reflinks of the last checkpoint's (copies of their own, sharing blocks until written)
where the file system has them, hard links where it does not; the run's last line says which. The reflink side
runs on a real btrfs (a small image file mounted through a loop device), the other on tmpfs (no reflinks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cachetrain.reflink import reflink
from tests.script_runs import run_script


def _mount(kind: str, folder: Path, tmp: Path) -> str | None:
    """Mount a small file system of ``kind`` at ``folder``; None when mounted, else why not."""
    if os.geteuid() != 0:
        return "mounting a file system in the test needs root"
    folder.mkdir(parents=True)
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)]
    else:
        if not shutil.which("mkfs.btrfs"):
            return "no mkfs.btrfs here (Debian's btrfs-progs) to make a file system with reflinks"
        image = tmp / "btrfs.img"
        with open(image, "wb") as handle:
            handle.truncate(256 << 20)  # sparse: a few MB on disk
        made = subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True, text=True)
        if made.returncode != 0:
            return f"mkfs.btrfs failed: {made.stderr.strip()}"
        command = ["mount", "-o", "loop", str(image), str(folder)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    return None if mounted.returncode == 0 else f"cannot mount {kind} here: {mounted.stderr.strip()}"


@pytest.fixture(scope="module", params=["btrfs", "tmpfs"])
def mounted(request, tmp_path_factory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    folder = tmp / "mount"
    reason = _mount(request.param, folder, tmp)
    if reason:
        pytest.skip(reason)
    try:
        yield request.param, folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_the_copy_helper_reflinks_where_it_can_and_leaves_nothing_where_it_cannot(mounted):
    kind, folder = mounted
    source, copy = folder / "weights.bin", folder / "copy.bin"
    source.write_bytes(b"weights" * 1000)
    if kind == "tmpfs":
        assert reflink(source, copy) is False and not copy.exists()
        return
    assert reflink(source, copy) is True
    assert copy.read_bytes() == source.read_bytes() and copy.stat().st_ino != source.stat().st_ino
    with open(copy, "r+b") as handle:  # damage to the copy in place ...
        handle.write(b"DAMAGED")
    assert source.read_bytes() == b"weights" * 1000  # ... is not damage to the source


def test_the_final_model_says_whether_its_files_are_its_own_or_shared_with_the_last_checkpoint(mounted,
                                                                                              tiny_sd_model,
                                                                                              cached_dataset):
    kind, folder = mounted
    output = folder / "run"
    done = run_script("train_from_cached.py", "--pretrained_model", str(tiny_sd_model), "--train_data_dir",
                      str(cached_dataset), "--output_dir", str(output), "--num_workers", "0", "--no_progress",
                      "--batch_size", "2", "--max_steps", "1", "--save_steps", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    final, in_checkpoint = (output / "unet" / "diffusion_pytorch_model.safetensors",
                            output / "checkpoint-00001" / "unet" / "diffusion_pytorch_model.safetensors")
    assert final.read_bytes() == in_checkpoint.read_bytes()
    if kind == "btrfs":
        assert (f"[train] final model in {output} (its files are reflinks of checkpoint-00001's: copies of their own "
                "that share blocks until written)") in done.stderr
        assert final.stat().st_ino != in_checkpoint.stat().st_ino
    else:
        assert (f"[train] final model in {output} (its weights are hard links to checkpoint-00001's files: this file "
                "system has no reflinks, so damage to one is damage to both; copy it elsewhere before editing it in "
                "place)") in done.stderr
        assert final.stat().st_ino == in_checkpoint.stat().st_ino
