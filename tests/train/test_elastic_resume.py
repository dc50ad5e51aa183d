"""Elastic resume: a run stopped mid-epoch and resumed on another number of processes (2 -> 1, 1 -> 2; torchrun,
gloo on CPU) trains the rest of its epoch, every sample once, at the same global batch; from a per-file tree and
from shards. The proof is the sample ids each process trained (--log_sample_ids), not the weights (the order of
a reduction differs with the process count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cachetrain.commands import pack
from cachetrain.train.bad_data import TrainingError
from cachetrain.train.elastic import SavedLayout, resumed_accumulation
from cachetrain.train.trainer import main
from tests.training_support import train_args as _args

REPO = Path(__file__).resolve().parents[2]
# 48 pairs, batch 4: 12 rows per epoch; 2 processes x accumulation 1 or 1 x 2: 6 optimizer steps of 8 pairs
COMMON = ("--batch_size", "4", "--max_steps", "6", "--save_steps", "2", "--log_every", "2", "--log_sample_ids")


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_from_cached.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _trained(output: Path) -> dict[int, list[int]]:
    """Optimizer step -> the sample ids all processes trained in it (from every rank's record)."""
    steps: dict[int, list[int]] = {}
    for record in sorted(output.glob("trained_samples.rank*.jsonl")):
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).extend(entry["samples"])
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


def _data(kind: str, cached_dataset: Path, tmp_path: Path) -> Path:
    if kind == "tree":
        return cached_dataset
    assert pack([str(cached_dataset), "--out", str(tmp_path / "shards"), "--pairs_per_shard", "8"]) == 0
    return tmp_path / "shards"


# each source once and each direction once: the resume's arithmetic is the same for both sources (the
# shard reader and the tree reader take the same epoch order), and each case launches torchrun (~30 s)
@pytest.mark.parametrize("kind, processes", [
    ("tree", (2, 1)), pytest.param("shards", (1, 2), marks=pytest.mark.slow),
], ids=lambda value: value if isinstance(value, str) else f"{value[0]}->{value[1]}")
def test_a_run_resumed_on_another_process_count_trains_the_rest_of_its_epoch_each_sample_once(
        tiny_sd_model, cached_dataset, tmp_path, capsys, kind, processes):
    data = _data(kind, cached_dataset, tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    before, after = processes
    # the first start trains the whole epoch; it is resumed from its step-2 checkpoint, as if stopped there
    accumulation = ("--gradient_accum", str(2 // before))
    if before == 2:
        done = _torchrun(*_args(tiny_sd_model, data, first, *COMMON, *accumulation))
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert main(_args(tiny_sd_model, data, first, *COMMON, *accumulation)) == 0
    resume = (*COMMON, *accumulation, "--resume", str(first / "checkpoint-00002"))  # the run's own flags
    if after == 2:
        done = _torchrun(*_args(tiny_sd_model, data, second, *resume))
        assert done.returncode == 0, done.stderr[-3000:]
        said = done.stderr
    else:
        capsys.readouterr()
        assert main(_args(tiny_sd_model, data, second, *resume)) == 0
        said = capsys.readouterr().err
    assert (f"--resume on {after} process(es), the run had {before}: --gradient_accum {2 // after} keeps its "
            "optimizer step of 2 micro-batches") in said

    whole_run, resumed = _trained(first), _trained(second)
    assert sorted(whole_run) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [3, 4, 5, 6]
    assert sorted(sum(whole_run.values(), [])) == list(range(48))  # the whole epoch, each sample once
    stopped_part = whole_run[1] + whole_run[2]
    trained = Counter(stopped_part + sum(resumed.values(), []))
    assert sorted(trained) == list(range(48)) and set(trained.values()) == {1}
    # the same global order: each step of the resumed start took the pairs the unstopped run took
    assert all(resumed[step] == whole_run[step] for step in resumed)
    summary = json.loads((second / "train_summary.json").read_text())
    assert summary["processes"] == after and summary["steps"] == 6
    assert sum(summary["process_sample_counts"]) == 32  # 4 steps x 8 pairs


def test_a_resume_on_a_process_count_that_cannot_keep_the_global_batch_is_refused_naming_the_counts_that_can(
        tiny_sd_model, cached_dataset, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    assert main(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "4", "--gradient_accum", "2",
                      "--max_steps", "2", "--save_steps", "2")) == 0
    checkpoint = output / "checkpoint-00002"
    resume = ("--batch_size", "4", "--max_steps", "4", "--resume", str(checkpoint))
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "3")  # as a launch of 3 processes sets it; refused before any starts
    assert main(_args(tiny_sd_model, cached_dataset, output, *resume, "--gradient_accum", "2")) == 2
    err = capsys.readouterr().err
    assert "the run's optimizer step is 2 micro-batches (1 process(es) x --gradient_accum 2); 3 processes " \
           "cannot share it evenly. Launch 1, 2 process(es)" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_args(tiny_sd_model, cached_dataset, output, *resume, "--gradient_accum", "4")) == 2
    assert "2 process(es) x --gradient_accum 4 would be 8. Pass --gradient_accum 1" in capsys.readouterr().err


def test_the_accumulation_of_a_resume_keeps_the_runs_global_batch():
    two_by_one = SavedLayout(processes=2, gradient_accum=1, epoch_rows=12)
    assert resumed_accumulation(two_by_one, 2, 1, False, Path("c"))[0] == 1
    accumulation, note = resumed_accumulation(two_by_one, 1, 1, False, Path("c"))
    assert accumulation == 2 and "--gradient_accum 2 keeps its optimizer step of 2 micro-batches" in note
    assert resumed_accumulation(SavedLayout(4, 3, 12), 2, 3, False, Path("c"))[0] == 6
    with pytest.raises(TrainingError, match="scale_loss_with_accum"):
        resumed_accumulation(two_by_one, 1, 1, True, Path("c"))
    # a checkpoint written before the rows were recorded: each process's micro-batches, epochs cut to a multiple
    from cachetrain.train.training_state import Progress

    old = SavedLayout(processes=2, gradient_accum=1, epoch_rows=None)
    assert old.rows_done(Progress(step=2, batch_in_epoch=2)) == 4
    assert old.epoch_rows_for(13) == 12
