"""A cache script killed with SIGKILL mid-run leaves only valid sidecars, and a rerun removes what killed writers\nleft and finishes the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cachetrain import sidecar
from cachetrain.tiny.models import make_shapes_dataset

from tests.conftest import REPO_ROOT
from tests.script_runs import run_script

IMAGES = 60


def test_sigkill_mid_run_leaves_only_valid_sidecars_and_a_rerun_completes(tmp_path, tiny_sd_model):
    root = tmp_path / "data"
    make_shapes_dataset(root, count=IMAGES, seed=3)
    # Resolution 128 with batches of one: about 50 ms per image, so the kill lands mid-run.
    command = [sys.executable, str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model),
               "--data_root", str(root), "--resolution", "128", "--batch_size", "1", "--num_workers", "0",
               "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(root.rglob("*.img_sdvae"))) < 5:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the script wrote nothing within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    survivors = sorted(root.rglob("*.img_sdvae"))
    assert 5 <= len(survivors) < IMAGES, "the kill must land mid-run"
    for path in survivors:
        latent = sidecar.read_sidecar(path, "latent", ndim=3)
        assert latent.shape == (4, 32, 32)
        assert sidecar.read_metadata(path)["source_size"] == str(path.with_suffix(".jpg").stat().st_size)

    visible = {p.suffix for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert visible == {".jpg", ".txt", ".img_sdvae"}  # a write cut short leaves at most a hidden temporary

    # The next run (an hour later) also finds what older writers left: safetensors' own save_file
    # temporary, and a hidden user file whose name only looks like one.
    sidecar_start = survivors[0].read_bytes()[:64]
    (root / "part1" / ".tmpK9pL2x").write_bytes(sidecar_start)
    (root / "part1" / ".tmpMyNote").write_text("a user's file")
    temporaries = [p for p in root.rglob("*") if sidecar.is_temporary(p.name)]
    for path in temporaries:
        old = path.stat().st_mtime - 3600
        os.utime(path, (old, old))
    leftovers = [p for p in temporaries if sidecar.is_abandoned_temporary_content(p)]
    assert len(leftovers) == len(temporaries) - 1

    # the rerun needs no process of its own: the script's function in this one, as its file calls it
    rerun = run_script(*command[1:])
    assert rerun.returncode == 0, rerun.stderr
    assert f"leftover temporaries of killed writers {len(leftovers)}, removed {len(leftovers)}" in rerun.stderr
    assert [p.name for p in root.rglob("*") if sidecar.is_temporary(p.name)] == [".tmpMyNote"]
    assert (f"written {IMAGES - len(survivors)} (rebuilt stale 0), skipped fresh {len(survivors)}, "
            "legacy kept 0, failed 0") in rerun.stderr
    assert len(list(root.rglob("*.img_sdvae"))) == IMAGES
