"""Faults a run of days meets, driven through train_from_cached.py as a user meets them.

Each test asserts the exit status (the README's table), the one line the user reads, and what is left
on disk. A full disk is a real one: a small tmpfs mounted for the test (needs root; skipped otherwise).
No fault here is injected by a test-only switch: each comes from real inputs (a model folder missing a
part, a scheduler config, a tokenizer longer than its text encoder, a folder that is a file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachetrain.train.run_dir import ExitStatus, exit_status
from tests.script_runs import run_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_from_cached.py"


def _train(model, data, output, *extra) -> subprocess.CompletedProcess:
    """A run of the script in this process (tests/script_runs.py), as a user starts it."""
    return run_script(SCRIPT, "--pretrained_model", model, "--train_data_dir", data, "--output_dir", output,
                      "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--batch_size", "2",
                      "--save_steps", "0", "--log_every", "1", *extra)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a refused start leaves: no traceback, no page of usage."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def _nothing_trained(output: Path) -> None:
    assert not list(output.glob("checkpoint-*")) and not (output / "tensorboard").exists()
    assert not (output / "train_summary.json").exists()
    assert not (output / "train_args.json").exists()  # the record of the run's starts holds no refused one


def _copy_model(tiny_sd_model: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_model, model)
    return model


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _fill(path: Path) -> None:
    """Write zeros into ``path`` until its disk has no byte left."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    chunk = 1 << 16
    try:
        while chunk:
            try:
                os.write(descriptor, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(descriptor)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own tmpfs; call it with a size ('7m') to mount it, remount it to grow it."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs mount, which needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(size)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---------------------------------------------------------------------------------------------
# Refused at start (status 2), before step 1


def test_a_model_folder_missing_a_part_is_refused_before_step_1_naming_it(tiny_sd_model, cached_dataset, tmp_path):
    model = _copy_model(tiny_sd_model, tmp_path)
    shutil.rmtree(model / "text_encoder")
    output = tmp_path / "run"
    done = _train(model, cached_dataset, output, "--max_steps", "2")
    assert done.returncode == ExitStatus.REFUSED
    line = _error_line(done)
    assert "'text_encoder'" in line and str(model / "text_encoder") in line
    _nothing_trained(output)


def test_sample_steps_the_sampling_scheduler_cannot_draw_are_refused_at_start(tiny_sd_model, cached_dataset,
                                                                              tmp_path):
    model = _copy_model(tiny_sd_model, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    assert config["_class_name"] == "PNDMScheduler"
    config_file.write_text(json.dumps({**config, "skip_prk_steps": False}))  # its warm-up needs more steps
    output = tmp_path / "run"
    done = _train(model, cached_dataset, output, "--max_steps", "2", "--sample_prompt", "a red circle",
                  "--sampler_steps", "2")
    assert done.returncode == ExitStatus.REFUSED
    line = _error_line(done)
    assert "--sampler_steps 2" in line and "PNDMScheduler" in line
    _nothing_trained(output)
    assert (output / ".frozen-components" / "cachetrain_source.json").exists()  # written before step 1


def test_a_start_refused_by_the_main_process_stops_every_process(tiny_sd_model, cached_dataset, tmp_path):
    model = _copy_model(tiny_sd_model, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "skip_prk_steps": False}))
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), "--pretrained_model", str(model), "--train_data_dir", str(cached_dataset),
               "--output_dir", str(output), "--num_workers", "0", "--no_progress", "--batch_size", "2",
               "--max_steps", "2", "--sample_prompt", "a red circle", "--sampler_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)  # no hang
    assert done.returncode != 0  # torchrun's own status for a failed process (each process exits 2)
    assert "error: --sampler_steps 2: the model's sampling scheduler PNDMScheduler" in done.stderr
    assert "error: the main process refused the start" in done.stderr
    _nothing_trained(output)


def test_an_output_dir_that_is_an_existing_file_is_refused(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    output.write_text("not a folder")
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "1")
    assert done.returncode == ExitStatus.REFUSED
    assert f"--output_dir {output} is an existing file" in _error_line(done)
    assert output.read_text() == "not a folder"


def test_resume_on_an_output_dir_without_a_checkpoint_is_refused_not_a_silent_new_run(tiny_sd_model, cached_dataset,
                                                                                      tmp_path):
    output = tmp_path / "run"
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "1", "--resume")
    assert done.returncode == ExitStatus.REFUSED
    line = _error_line(done)
    assert "--resume" in line and "holds no checkpoint" in line and "--resume auto" in line
    _nothing_trained(output)


def test_an_unknown_optimizer_is_one_line_not_a_page_of_usage(tiny_sd_model, cached_dataset, tmp_path):
    done = _train(tiny_sd_model, cached_dataset, tmp_path / "run", "--optimizer", "sgd")
    assert done.returncode == ExitStatus.REFUSED
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "--optimizer" in done.stderr and "'sgd'" in done.stderr


@pytest.mark.parametrize("model", ["/no/such/model/folder", "no-such-user/no-such-model"])
def test_a_model_that_is_neither_a_folder_nor_a_reachable_hub_id_is_one_line(cached_dataset, tmp_path, model):
    output = tmp_path / "run"
    done = _train(model, cached_dataset, output, "--max_steps", "1")
    assert done.returncode == ExitStatus.REFUSED
    line = _error_line(done)
    assert f"--pretrained_model {model}: no such folder, and not a hub id that can be reached" in line
    assert "HF_HUB_OFFLINE" in line


def test_a_full_disk_at_start_is_refused_and_leaves_train_args_whole(tiny_sd_model, cached_dataset, small_disk):
    output = small_disk("1m")
    earlier = json.dumps([{"started": "2026-11-30T10:00:00+0000", "argv": [], "config": {}}], indent=2)
    (output / "train_args.json").write_text(earlier)
    _fill(output / "filler")
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "1")
    assert done.returncode == ExitStatus.REFUSED
    assert f"--output_dir {output} cannot be written (No space left on device)" in _error_line(done)
    assert (output / "train_args.json").read_text() == earlier  # never rewritten in place
    assert sorted(p.name for p in output.iterdir()) == ["filler", "train_args.json"]  # no temporaries


# ---------------------------------------------------------------------------------------------
# During the run: samples and saves that fail


def test_a_failing_sample_is_reported_counted_and_training_goes_on(tiny_sd_model, cached_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _copy_model(tiny_sd_model, tmp_path)
    # a tokenizer that pads prompts past the text encoder's 77 positions: fails in sampling only
    tokenizer_config = model / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 100}))
    output = tmp_path / "run"
    done = _train(model, cached_dataset, output, "--max_steps", "2", "--save_steps", "1",
                  "--sample_prompt", "a red circle", "a blue square", "--sampler_steps", "1")
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert ("sample 1 at step 1 failed for prompt 'a blue square' (ValueError: Sequence length must be less "
            "than max_position_embeddings") in done.stdout
    assert "sample 0 at step 2 failed for prompt 'a red circle'" in done.stdout
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-00001", "checkpoint-00002"]
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").exists()  # the final model
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["failed_samples"] == 4 and summary["exit_status"] == 0 and summary["final_model_saved"]
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/failed_samples")] == [(1, 2.0), (2, 4.0)]


def test_saves_failing_on_a_full_disk_stop_the_run_after_max_failed_saves(tiny_sd_model, cached_dataset,
                                                                          small_disk):
    # room to write the frozen parts (~3.9 MB; ~8 MB while saving), not for a checkpoint (~12 MB more)
    output = small_disk("12m")
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "10", "--save_steps", "1",
                  "--max_failed_saves", "2")
    assert done.returncode == ExitStatus.SAVE_FAILED, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    everything = done.stdout + done.stderr
    assert "could not save checkpoint at step 1" in everything and "could not save checkpoint at step 2" in everything
    assert "no checkpoint of this run is saved yet" in everything and "None" not in everything
    assert ("2 checkpoint saves in a row failed (limit --max_failed_saves 2); stopping at step 2 rather than "
            "training on with nothing to show. No checkpoint of this run was saved.") in done.stderr
    assert not list(output.glob("checkpoint-*")) and not list(output.glob("*.partial"))
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["failed_saves"] == [1, 2] and summary["exit_status"] == 4


@pytest.mark.slow
def test_after_a_failed_save_a_resume_gives_the_weights_of_a_run_that_never_failed(tiny_sd_model, cached_dataset,
                                                                                    tmp_path, small_disk):
    flags = ("--max_steps", "3", "--save_steps", "1", "--seed", "3")
    straight = _train(tiny_sd_model, cached_dataset, tmp_path / "straight", *flags)
    assert straight.returncode == ExitStatus.FINISHED, straight.stderr[-3000:]

    output = small_disk("22m")  # the frozen parts (~3.9 MB) and one checkpoint (~12 MB) fit, a second does not
    faulted = _train(tiny_sd_model, cached_dataset, output, *flags)
    assert faulted.returncode == ExitStatus.SAVE_FAILED, faulted.stderr[-3000:]
    assert ("could not save checkpoint at step 2" in faulted.stdout
            and "the newest saved checkpoint, checkpoint-00001, is intact" in faulted.stdout)
    assert "training goes on (1 of --max_failed_saves 3 failed saves in a row)" in faulted.stdout
    assert "the final checkpoint could not be saved" in faulted.stderr
    assert f"The newest checkpoint on disk is {output / 'checkpoint-00001'}" in faulted.stderr
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-00001"]
    assert not (output / "unet").exists()  # no final model, and the status says so

    small_disk("64m")  # room made
    resumed = _train(tiny_sd_model, cached_dataset, output, *flags, "--resume")
    assert resumed.returncode == ExitStatus.FINISHED, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr
    expected, got = _unet(tmp_path / "straight"), _unet(output)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("resume", ["auto", "checkpoint-00002"])
def test_after_a_failed_save_the_log_names_the_newest_whole_checkpoint_not_a_damaged_newer_one(
        tiny_sd_model, cached_dataset, small_disk, resume):
    output = small_disk("48m")
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2").returncode == 0
    damaged = output / "checkpoint-00004" / "training_state.pt"
    data = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(data[: len(data) // 2])  # a partial copy
    filler = output / "filler"
    _fill(filler)
    os.truncate(filler, filler.stat().st_size - (1 << 20))  # room for the start's small files, not a checkpoint
    resumed = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume",
                     resume if resume == "auto" else str(output / resume))
    assert resumed.returncode == ExitStatus.SAVE_FAILED, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert f"resumed from {output / 'checkpoint-00002'} at step 2" in resumed.stderr
    assert ("could not save checkpoint at step 4" in resumed.stdout
            and "the newest saved checkpoint, checkpoint-00002, is intact" in resumed.stdout), resumed.stdout[-3000:]
    assert f"The newest checkpoint on disk is {output / 'checkpoint-00002'} (continue" in resumed.stderr
    assert "checkpoint-00004, is intact" not in resumed.stdout and f"is {output / 'checkpoint-00004'}" not in \
        resumed.stderr


def test_a_stop_whose_checkpoint_cannot_be_saved_is_a_failed_save_not_a_clean_stop(tiny_sd_model, cached_dataset,
                                                                                   small_disk):
    output = small_disk("12m")  # the frozen parts fit, a checkpoint does not
    command = [sys.executable, str(SCRIPT), "--pretrained_model", str(tiny_sd_model), "--train_data_dir",
               str(cached_dataset), "--output_dir", str(output), "--num_workers", "0", "--no_progress",
               "--batch_size", "2", "--save_steps", "0", "--max_steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / "tensorboard").exists() and time.monotonic() < deadline:  # made just before step 1
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == ExitStatus.SAVE_FAILED, err[-3000:]
    assert "SIGTERM received" in out and "could not save checkpoint at step" in out
    assert "but its checkpoint could not be saved; No checkpoint of this run was saved." in err
    assert "continue with --resume" not in err and not list(output.glob("checkpoint-*"))


def test_a_run_stopped_by_a_problem_during_training_has_its_own_status(tiny_sd_model, cached_dataset, tmp_path):
    # a learning rate so large that the first update overflows the next forward: NaN gradients from then on
    done = _train(tiny_sd_model, cached_dataset, tmp_path / "run", "--learning_rate", "1e30", "--max_steps", "20",
                  "--max_bad_steps", "2", "--log_every", "2")
    assert done.returncode == ExitStatus.HALTED, done.stderr[-3000:]
    assert "optimizer steps in a row had NaN/Inf gradients (limit --max_bad_steps 2)" in _error_line(done)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["exit_status"] == ExitStatus.HALTED and "--max_bad_steps 2" in summary["halted"]


# ---------------------------------------------------------------------------------------------
# The run folder's small files


def test_a_corrupt_train_args_json_is_set_aside_and_the_run_goes_on(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    truncated = '[\n  {\n    "started": "2026-11-30T10:00:00+0000",\n    "argv": ["train_fr'
    (output / "train_args.json").write_text(truncated)
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "1", "--resume", "auto")
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert f"{output / 'train_args.json'} was damaged" in done.stderr
    assert "kept it as train_args.json.corrupt" in done.stderr
    assert "--resume auto: no checkpoint in" in done.stderr and "starting a new run" in done.stderr
    assert (output / "train_args.json.corrupt").read_text() == truncated
    starts = json.loads((output / "train_args.json").read_text())
    assert len(starts) == 1 and starts[0]["config"]["resume"] == "auto"
    assert not list(output.glob(".*.partial-*"))  # the atomic writer's temporaries are gone

    again = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2", "--resume", "auto")
    assert again.returncode == ExitStatus.FINISHED, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 1" in again.stderr
    assert len(json.loads((output / "train_args.json").read_text())) == 2


@pytest.mark.parametrize("outcome, status", [
    (dict(stopped=False, failed_saves=0, final_saved=True, stop_saved=False), ExitStatus.FINISHED),
    (dict(stopped=False, failed_saves=0, final_saved=False, stop_saved=False), ExitStatus.SAVE_FAILED),
    (dict(stopped=False, failed_saves=1, final_saved=True, stop_saved=False), ExitStatus.SAVE_FAILED),
    (dict(stopped=True, failed_saves=0, final_saved=False, stop_saved=True), ExitStatus.STOPPED),
    (dict(stopped=True, failed_saves=1, final_saved=False, stop_saved=False), ExitStatus.SAVE_FAILED),
    (dict(stopped=True, failed_saves=1, final_saved=False, stop_saved=True), ExitStatus.SAVE_FAILED),
])
def test_the_exit_status_is_zero_only_when_the_final_model_and_every_due_save_were_written(outcome, status):
    assert exit_status(**outcome) == status
    assert len({ExitStatus.FINISHED, ExitStatus.CRASHED, ExitStatus.REFUSED, ExitStatus.STOPPED,
                ExitStatus.SAVE_FAILED, ExitStatus.HALTED}) == 6


def test_the_settings_archive_keeps_every_version_of_the_copied_settings_file(tmp_path):
    from cachetrain.train.run_dir import archive_settings

    settings, output = tmp_path / "train_sd.sh", tmp_path / "run"
    output.mkdir()
    for text in ("LR=1e-5\n", "LR=1e-5\n", "LR=2e-5\n"):
        settings.write_text(text)
        archive_settings(output, {"learning_rate": text}, str(settings))
    assert (output / "train_sd.sh").read_text() == "LR=1e-5\n"
    assert (output / "train_sd.1.sh").read_text() == "LR=2e-5\n"
    assert len(json.loads((output / "train_args.json").read_text())) == 3
    assert sorted(p.name for p in output.iterdir()) == ["train_args.json", "train_sd.1.sh", "train_sd.sh"]
