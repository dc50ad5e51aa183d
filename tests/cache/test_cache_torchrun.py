"""Under torchrun, the processes of one launch share the files: disjoint, and together every file once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cachetrain import sidecar

from tests.conftest import REPO_ROOT

IMAGES_IN_DATASET = 48


def test_two_torchrun_processes_cover_every_image_exactly_once(tmp_path, tiny_sd_model, shapes_dataset):
    report = tmp_path / "report.jsonl"
    (shapes_dataset / "part0" / "broken.jpg").write_bytes(b"")  # one problem, reported by exactly one rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model), "--data_root",
               str(shapes_dataset), "--resolution", "64", "--num_workers", "0", "--no_progress",
               "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    # Both processes finish their share, then both exit 1: the broken image has no sidecar.
    assert result.returncode == 1, result.stderr
    summaries = re.findall(r"^written (\d+) .*, failed (\d+),", result.stderr, flags=re.MULTILINE)
    assert sorted(summaries) == [("24", "0"), ("24", "1")], result.stderr
    latents = [p for p in shapes_dataset.rglob("*.img_sdvae")]
    assert len(latents) == IMAGES_IN_DATASET
    assert all(sidecar.read_metadata(p)["kind"] == "image_latent" for p in latents)
    # Each rank wrote its own report; together they hold the one problem, once.
    lines = [json.loads(line) for rank in (0, 1) for line in Path(f"{report}.rank{rank}").read_text().splitlines()]
    assert [(Path(line["path"]).name, line["kind"]) for line in lines] == [("broken.jpg", "empty file")]
