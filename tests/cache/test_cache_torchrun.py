"""Under torchrun, the processes of one launch share the files: disjoint, and together every file once;
the launch's first process sums up all of them and merges the data index once, after all have written.
The same across two nodes (torchrun --nnodes 2, rendezvous on 127.0.0.1, gloo on CPU)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cachetrain import sidecar
from cachetrain.data_index import read_index

from tests.conftest import CACHED_RESOLUTION, REPO_ROOT

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
    shares = re.findall(r"process 1 of 2: written (\d+), skipped fresh \d+, failed (\d+)", result.stderr)
    assert len(shares) == 1 and int(shares[0][0]) + int(shares[0][1]) == 24, result.stderr
    summaries = re.findall(r"^written (\d+) .*, failed (\d+),", result.stderr, flags=re.MULTILINE)
    assert summaries == [("48", "1")], result.stderr  # process 0 counts both shares
    latents = [p for p in shapes_dataset.rglob("*.img_sdvae")]
    assert len(latents) == IMAGES_IN_DATASET
    assert all(sidecar.read_metadata(p)["kind"] == "image_latent" for p in latents)
    # Each rank wrote its own report; together they hold the one problem, once.
    lines = [json.loads(line) for rank in (0, 1) for line in Path(f"{report}.rank{rank}").read_text().splitlines()]
    assert [(Path(line["path"]).name, line["kind"]) for line in lines] == [("broken.jpg", "empty file")]


def _content(path: Path) -> tuple[dict, dict]:
    """(metadata, each tensor's dtype, shape and raw bytes) of a sidecar."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: (str(handle.get_tensor(key).dtype), tuple(handle.get_tensor(key).shape),
                         handle.get_tensor(key).numpy().tobytes()) for key in handle.keys()}
        return handle.metadata(), tensors


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(script: str, *args: str) -> list[subprocess.CompletedProcess]:
    """One torchrun per node, as a scheduler starts them on two machines (here: one machine, two launches)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                                  str(port), str(REPO_ROOT / script), *args],
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    done = []
    for launch in launches:
        out, err = launch.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_nodes_cache_disjoint_shares_to_the_bytes_of_one_process_and_index_every_pair_once(
        tiny_sd_model, shapes_dataset, _cached_template):
    common = ["--model", str(tiny_sd_model), "--data_root", str(shapes_dataset), "--num_workers", "0",
              "--no_progress", "--save_dtype", "float32"]
    for script, suffix, extra in (("create_img_sdvae.py", ".img_sdvae", ["--resolution", str(CACHED_RESOLUTION)]),
                                  ("create_clipl.py", ".txt_clipl", [])):
        node0, node1 = _two_nodes(script, *common, *extra)
        assert (node0.returncode, node1.returncode) == (0, 0), node0.stderr[-3000:] + node1.stderr[-3000:]
        assert re.search(r"^written 48 .*failed 0,", node0.stderr, flags=re.MULTILINE), node0.stderr[-3000:]
        share = re.search(r"process 1 of 2: written (\d+),", node1.stderr)
        assert share and int(share.group(1)) == 24 and "indexing" not in node1.stderr
        # every image has exactly one sidecar, holding what a single process writes: the same tensor bytes
        # and metadata (safetensors orders the header's metadata keys differently in every process, so
        # whole files differ even between two single-process runs)
        made = sorted(p.relative_to(shapes_dataset) for p in shapes_dataset.rglob(f"*{suffix}"))
        alone = sorted(p.relative_to(_cached_template) for p in _cached_template.rglob(f"*{suffix}"))
        assert made == alone and len([p for p in made if not p.name.startswith(".")]) == IMAGES_IN_DATASET
        assert all(_content(shapes_dataset / p) == _content(_cached_template / p) for p in made)
    table = read_index(str(shapes_dataset))  # merged once, by node 0, after both had written
    assert table is not None and len(table) == IMAGES_IN_DATASET
    assert table.pair_count(".img_sdvae", ".txt_clipl") == IMAGES_IN_DATASET
    for suffix in (".img_sdvae", ".txt_clipl"):  # both nodes' sidecars recorded fresh for the next rerun
        assert (table.fresh_digests[:, table.suffixes.index(suffix)] != 0).sum() == IMAGES_IN_DATASET
