"""Ctrl-C / SIGTERM sent to a cache script: the first stops it after the sidecar in hand, with its summary and
the count of files not attempted; a second stops it at once. Either way what is written is whole, no temporary
is left, there is no traceback, and a rerun finishes the rest."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cachetrain import sidecar
from cachetrain.tiny.models import make_shapes_dataset

from tests.conftest import REPO_ROOT

IMAGES = 60


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGINT, signal.SIGTERM)], ids=["once", "twice"])
def test_a_signal_stops_a_cache_script_with_its_summary_and_a_second_stops_it_at_once(tmp_path, tiny_sd_model,
                                                                                      signals):
    root = tmp_path / "data"
    make_shapes_dataset(root, count=IMAGES, seed=3)
    # resolution 128, batches of one: about 50 ms per image, so the signal lands mid-run
    command = [sys.executable, str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model),
               "--data_root", str(root), "--resolution", "128", "--batch_size", "1", "--num_workers", "0",
               "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240  # imports take long on a busy machine
    while len(list(root.rglob("*.img_sdvae"))) < 5:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the script wrote nothing within 240 s"
        time.sleep(0.005)
    for number, sent in enumerate(signals):
        if number:
            time.sleep(0.02)
        process.send_signal(sent)
    started = time.monotonic()
    _out, err = process.communicate(timeout=60)
    assert time.monotonic() - started < 20
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode == 1, err[-3000:]  # not every input has its sidecar
    assert "SIGINT received: stopping after the current sidecar" in err
    reason = "SIGTERM received twice, stopped at once" if len(signals) == 2 else "SIGINT received"
    stopped = re.search(rf"\[cache\] stopped: {reason}; (\d+) files not attempted", err)
    assert stopped, err[-3000:]
    written = sorted(root.rglob("*.img_sdvae"))
    assert len(written) + int(stopped.group(1)) == IMAGES
    for path in written:
        assert sidecar.read_sidecar(path, "latent", ndim=3).shape == (4, 32, 32)
    assert not [p for p in root.rglob("*") if sidecar.is_temporary(p.name)]

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list(root.rglob("*.img_sdvae"))) == IMAGES
