"""The training loop on the tiny model: accumulation, resume, saving, stopping, safety, processes, learning.

Expected values are computed here directly, not with the trainer's own helpers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cachetrain.train.config import parse_train_args
from cachetrain.train.processes import check_process_count
from cachetrain.train.trainer import TrainingError, main, train
from tests.conftest import CACHED_LATENT_SHAPE
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import train_caption_probe
from tests.training_support import unet_weights as _unet_weights

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Accumulation and resume


def test_accumulated_micro_batches_equal_one_big_batch(tiny_sd_model, cached_dataset, tmp_path):
    accumulated = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "acc", "--batch_size", "4",
                                               "--gradient_accum", "2", "--max_steps", "2", "--log_every", "1")))
    big = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "big", "--batch_size", "8",
                                       "--gradient_accum", "1", "--max_steps", "2", "--log_every", "1")))
    assert accumulated.steps == big.steps == 2
    for name in ("train/loss", "train/grad_norm"):  # the gradient norm is sensitive to any scale error
        logged_a, logged_b = _logged(accumulated, name), _logged(big, name)
        assert [step for step, _ in logged_a] == [step for step, _ in logged_b] == [1, 2]
        for (_, a), (_, b) in zip(logged_a, logged_b):
            assert a == pytest.approx(b, rel=1e-4), name
    # Adam divides by sqrt(v): where a gradient is near eps, float noise in it moves the update by a
    # fraction of the learning rate (1e-3): a handful of the 1M weights, by up to ~1e-4 with these
    # draws. A wrong accumulation would move most weights by ~1e-3.
    weights_a, weights_b = _unet_weights(tmp_path / "acc"), _unet_weights(tmp_path / "big")
    differences = torch.cat([(weights_a[name] - weights_b[name]).abs().flatten() for name in weights_a])
    assert differences.max().item() < 2e-4
    assert (differences > 1e-6).float().mean().item() < 1e-3
    assert differences.mean().item() < 1e-8


@pytest.mark.parametrize("precision", [["--optimizer", "adamw"], ["--optimizer", "adamw8"], ["--optimizer", "lion"],
                                       ["--optimizer", "adamw", "--bf16_weights", "--batch_size", "2"]], ids=" ".join)
def test_a_stopped_and_resumed_run_equals_one_that_never_stopped(tiny_sd_model, cached_dataset, tmp_path, precision):
    # 48 pairs, batch 4, accumulation 2: 6 optimizer steps per epoch; step 7 is in the next epoch. The stop
    # arrives after 7 micro-batches, in the middle of step 4's accumulation: the run finishes step 4, then
    # saves. (bf16 weights, slow on a CPU, take batch 2: 12 steps per epoch.)
    common = ("--batch_size", "4", "--gradient_accum", "2", "--max_steps", "9", "--log_every", "1",
              "--scheduler", "cosine", "--warmup_steps", "2", "--ema_decay", "0.9", "--use_snr", *precision)
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common)),
                    interrupt_after_batches=7)
    assert stopped.interrupted and stopped.steps == 4
    state = torch.load(tmp_path / "resumed" / "checkpoint-00004" / "training_state.pt", weights_only=True)
    assert state["progress"] == {"step": 4, "epoch": 0, "batch_in_epoch": 8, "skipped_samples": 0,
                                 "skipped_steps": 0}
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                           "--resume")))
    assert resumed.steps == 9
    assert _logged(stopped, "train/loss") + _logged(resumed, "train/loss") == _logged(straight, "train/loss")
    assert (_logged(stopped, "train/learning_rate") + _logged(resumed, "train/learning_rate")
            == _logged(straight, "train/learning_rate"))
    for component in ("unet", "unet_ema"):
        a = _unet_weights(tmp_path / "straight" / "checkpoint-00009", component)
        b = _unet_weights(tmp_path / "resumed" / "checkpoint-00009", component)
        assert all(torch.equal(a[name], b[name]) for name in a), component


def test_a_resume_that_cannot_continue_the_run_fails_naming_what_changed(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    common = ("--batch_size", "8", "--save_steps", "1")
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common, "--max_steps", "2")))
    checkpoint = output / "checkpoint-00002"
    with pytest.raises(TrainingError, match="batch_size was 8, now 4; the data order would not continue"):
        train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common, "--max_steps", "4",
                                     "--resume", "--batch_size", "4")))
    for changed, message in ((["--optimizer", "lion"], "optimizer was adamw, now lion"),
                             (["--targetted_training", "--unfreeze_attention"], "trainable_tensors was ")):
        with pytest.raises(TrainingError, match=message) as failure:
            train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common, "--max_steps", "4",
                                         "--resume", *changed)))
        assert f"--pretrained_model {checkpoint}" in str(failure.value)
    # a checkpoint written before the optimizer was recorded: its saved flags tell
    state_file = checkpoint / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["optimizer_identity"]
    torch.save(state, state_file)
    with pytest.raises(TrainingError, match="optimizer was adamw, now lion"):
        train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common, "--max_steps", "4",
                                     "--resume", "--optimizer", "lion")))
    # the same optimizer in bf16: its state converts, and training goes on
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common, "--max_steps", "4",
                                           "--resume", "--bf16_weights")))
    assert resumed.steps == 4


def test_an_epoch_that_ends_inside_an_accumulation_saves_at_the_next_step_and_resumes_exactly(
        tiny_sd_model, cached_dataset, tmp_path):
    # 12 micro-batches per epoch, 5 per optimizer step: epoch 0 ends inside step 3 (micro-batches 11-15)
    common = ("--batch_size", "4", "--gradient_accum", "5", "--max_steps", "5", "--log_every", "1",
              "--save_on_epoch", "--learning_rate_decay", "1e-4")
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == \
        ["checkpoint-00003", "checkpoint-00005"]
    state = torch.load(tmp_path / "straight" / "checkpoint-00003" / "training_state.pt", weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["batch_in_epoch"]) == (1, 3)
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                           "--resume", str(tmp_path / "straight" / "checkpoint-00003"))))
    assert _logged(resumed, "train/loss") == _logged(straight, "train/loss")[3:]
    assert _logged(resumed, "train/learning_rate") == _logged(straight, "train/learning_rate")[3:]
    a = _unet_weights(tmp_path / "straight" / "checkpoint-00005")
    b = _unet_weights(tmp_path / "resumed" / "checkpoint-00005")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_fresh_run_refuses_an_output_dir_that_holds_another_runs_checkpoints(tiny_sd_model, cached_dataset,
                                                                                tmp_path, capsys):
    args = _args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8", "--max_steps", "1")
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds checkpoints of a run (newest: checkpoint-00001)" in capsys.readouterr().err


def test_sigterm_saves_a_resumable_checkpoint_and_exits_with_the_stopped_status(tiny_sd_model, cached_dataset,
                                                                               tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, str(REPO / "train_from_cached.py"),
               *_args(tiny_sd_model, cached_dataset, output, "--batch_size", "4", "--max_steps", "100000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (output / "tensorboard").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps in
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 3, out  # stopped, resumable: not a success a scheduler would drop
    assert "SIGTERM received" in out and "continue with --resume" in out
    checkpoints = list(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.pt").exists()
    assert not list(output.glob("*.partial"))


def test_trigger_file_saves_a_checkpoint_after_the_current_step(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "trigger.checkpoint").touch()
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8", "--max_steps", "3")))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00001", "checkpoint-00003"]
    assert not (output / "trigger.checkpoint").exists()


def test_keep_checkpoints_prunes_the_oldest(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8", "--max_steps", "5",
                                 "--save_steps", "1", "--keep_checkpoints", "2")))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00004", "checkpoint-00005"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_training_goes_on(tiny_sd_model, cached_dataset, tmp_path,
                                                                          monkeypatch, capsys):
    from cachetrain.train import checkpoint

    real_write = checkpoint.write_model_folder
    calls = []

    def disk_full_on_second_save(destination, *args, **kwargs):
        calls.append(destination.name)
        real_write(destination, *args, **kwargs)
        if len(calls) == 2:  # what torch.save raises when the disk fills up
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 6912 vs 6848")

    monkeypatch.setattr(checkpoint, "write_model_folder", disk_full_on_second_save)
    output = tmp_path / "run"
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8",
                                          "--max_steps", "3", "--save_steps", "1")))
    assert result.steps == 3
    assert "could not save checkpoint at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00001", "checkpoint-00003"]


def test_every_checkpoint_file_is_on_disk_before_the_checkpoint_is_published(tiny_sd_model, cached_dataset,
                                                                            tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def recording_replace(source, destination):
        events.append(("rename", str(source), str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    output = tmp_path / "run"
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8", "--max_steps", "2",
                                 "--save_steps", "1")))
    for name in ("checkpoint-00001", "checkpoint-00002"):
        published = events.index(("rename", str(output / f"{name}.partial"), str(output / name)))
        synced = {event[1] for event in events[:published] if event[0] == "fsync"}
        files = [path for path in (output / name).rglob("*") if path.is_file()]
        assert len(files) > 5
        unsynced = [path for path in files
                    if str(output / f"{name}.partial" / path.relative_to(output / name)) not in synced]
        assert not unsynced, unsynced
        assert ("fsync", str(output)) in events[published:]  # and the rename itself


# ---------------------------------------------------------------------------------------------
# Safety


def test_a_run_of_bad_steps_stops_with_a_clear_message(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.sidecar import read_metadata, write_sidecar

    for path in cached_dataset.rglob("*.img_sdvae"):
        # finite: not bad data
        write_sidecar(path, {"latent": torch.full(CACHED_LATENT_SHAPE, 3e38)}, read_metadata(path))
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row had NaN/Inf gradients"):
        train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                     "--max_steps", "20", "--log_every", "3", "--max_bad_steps", "3")))


# ---------------------------------------------------------------------------------------------
# Flags and processes


@pytest.mark.parametrize("flags, message", [
    (["--unfreeze_attention"], "add it"),
    (["--targetted_training"], "needs a selection"),
    (["--bf16_weights", "--optimizer", "adamw8"], "stochastic rounding"),
    (["--scheduler", "cosine", "--learning_rate_decay", "0.1"], "constant only"),
    (["--validation_split", "0.1", "--validation_dir", "v"], "not both"),
    (["--max_steps", "ten"], "Ne for N epochs"),
])
def test_invalid_combinations_fail_at_start_with_the_flag_named(flags, message, tmp_path, capsys):
    code = main(["--pretrained_model", str(tmp_path / "no-such-model"), "--train_data_dir", str(tmp_path), *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_launch_of_two_processes_seen_as_one_fails_loudly():
    with pytest.raises(TrainingError, match="launched as 2 processes but training sees 1"):
        check_process_count(launched_world=2, accelerator_world=1)
    check_process_count(launched_world=2, accelerator_world=2)


def test_two_process_cpu_training_keeps_weights_identical(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "ddp"
    output.mkdir()
    (output / "trigger.checkpoint").touch()  # seen by the main process only: both must agree to save
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_from_cached.py"),
               *_args(tiny_sd_model, cached_dataset, output, "--batch_size", "4", "--max_steps", "6",
                      "--log_every", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the run's lock taken once, by the main process (a second process taking it would have been refused)
    assert "is in use by another run" not in done.stderr
    assert (output / ".run.lock").read_text().split()[1] == socket.gethostname()
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    first, second = summary["process_weight_checksums"]
    assert first == second and math.isfinite(first)
    # 6 steps x batch 4 = one epoch share of 24 pairs per process; disjoint shares cover pairs 0..47
    assert summary["process_sample_counts"] == [24, 24]
    assert sum(summary["process_sample_id_sums"]) == sum(range(48))
    assert summary["process_sample_id_sums"][0] != summary["process_sample_id_sums"][1]
    assert "6 batches/epoch/process x 2 process(es)" in done.stderr  # 48 pairs / 2 processes / batch 4
    # the requested checkpoint came at the first logging step, where the processes compare requests
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00002", "checkpoint-00006"]


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
def test_a_short_run_learns_to_use_its_text(tiny_sd_model, tmp_path):
    """On held-out pairs, at fixed noise and timesteps, the true caption beats another caption."""
    from cachetrain.models.loading import load_training_scheduler

    probe = train_caption_probe(tiny_sd_model, tmp_path, lambda data, output: _args(
        tiny_sd_model, data, output, "--batch_size", "8", "--max_steps", "400", "--validation_split", "0.25", "--learning_rate", "2e-3"))
    alpha_bar = load_training_scheduler(str(tiny_sd_model)).alphas_cumprod
    timesteps = torch.linspace(300, 700, len(probe.latents)).long()  # where the caption decides most
    a = alpha_bar[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * probe.latents + (1 - a).sqrt() * probe.noise

    def per_sample_loss(embeddings):
        with torch.no_grad():
            return (probe.unet(noisy, timesteps, embeddings).sample - probe.noise).square().mean(dim=(1, 2, 3))

    true_loss, other_loss, wins = probe.true_caption_wins(per_sample_loss)
    assert true_loss < 0.99 * other_loss
    assert wins >= 0.75


def test_a_text_scale_a_clip_pipeline_cannot_store_is_refused_before_loading(tiny_sd_model, cached_dataset,
                                                                            tmp_path, capsys):
    assert main(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--text_scaling_factor", "2")) == 2
    assert "no text projection to keep the scale" in capsys.readouterr().err


