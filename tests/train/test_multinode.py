"""Two nodes (torchrun --nnodes 2 --nproc_per_node 1, rendezvous on 127.0.0.1, gloo on CPU): from shards
and from a shared per-file tree, disjoint shares, one checkpoint writer, the same weights either way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cachetrain.commands import pack
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(model: Path, data: Path, output: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """One torchrun per node, as a scheduler starts them on two machines (here: one machine, two launches)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                                  str(port), str(REPO / "train_from_cached.py"),
                                  *_args(model, data, output, *extra)],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    done = []
    for launch in launches:
        out, err = launch.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_nodes_train_disjoint_shares_from_shards_and_from_a_tree_to_the_same_weights(
        tiny_sd_model, cached_dataset, tmp_path):
    assert pack([str(cached_dataset), "--out", str(tmp_path / "shards"), "--pairs_per_shard", "8"]) == 0
    common = ("--batch_size", "4", "--max_steps", "6", "--log_every", "2", "--save_steps", "3")
    for data, output in ((tmp_path / "shards", tmp_path / "from-shards"), (cached_dataset, tmp_path / "from-tree")):
        done = _two_nodes(tiny_sd_model, data, output, *common)
        assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
        summary = json.loads((output / "train_summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 6
        first, second = summary["process_weight_checksums"]
        assert first == second
        # 6 steps x batch 4 per process = one epoch: disjoint shares covering pairs 0..47 once
        assert summary["process_sample_counts"] == [24, 24]
        assert sum(summary["process_sample_id_sums"]) == sum(range(48))
        assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00003", "checkpoint-00006"]
        assert "[train] saved" in done[0].stdout + done[0].stderr
        assert "[train] saved" not in done[1].stdout + done[1].stderr  # one checkpoint writer: node 0
    a, b = _unet_weights(tmp_path / "from-shards"), _unet_weights(tmp_path / "from-tree")
    assert all(torch.equal(a[name], b[name]) for name in a)
