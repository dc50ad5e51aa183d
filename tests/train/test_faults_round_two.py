"""Faults of the second round, driven through train_from_cached.py (and cachetrain.export) as a user meets them:
a damaged newest checkpoint, two runs in one output folder, a second stop signal, a resume of a finished run,
and flags whose values were accepted only to fail later. Each asserts the status, the line read and the files left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachetrain.train.run_dir import ExitStatus
from tests.script_runs import run_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_from_cached.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _command(model, data, output, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), "--pretrained_model", str(model), "--train_data_dir", str(data),
            "--output_dir", str(output), "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3",
            "--batch_size", "2", "--save_steps", "0", "--log_every", "1", *extra]


def _train(model, data, output, *extra) -> subprocess.CompletedProcess:
    """A run of the script in this process (tests/script_runs.py); ``_start`` starts one of its own."""
    return run_script(*_command(model, data, output, *extra)[1:])


def _start(model, data, output, *extra) -> subprocess.Popen:
    return subprocess.Popen(_command(model, data, output, *extra), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.1)


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _truncate(path: Path) -> None:
    """A partial copy: the first half of the file, under its own name."""
    data = path.read_bytes()
    path.unlink()  # a new file: the final model's hard link keeps the whole one
    path.write_bytes(data[: len(data) // 2])


# -- a damaged newest checkpoint ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damaged", ["training_state.pt", "unet/diffusion_pytorch_model.safetensors"])
def test_a_damaged_newest_checkpoint_is_skipped_by_resume_and_refused_when_named(tiny_sd_model, cached_dataset,
                                                                                tmp_path, damaged):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2").returncode == 0
    whole_final = _unet(output)
    newest = output / "checkpoint-00004"
    _truncate(newest / damaged)

    named = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", str(newest))
    assert named.returncode == ExitStatus.REFUSED
    assert f"--resume {newest}: damaged checkpoint: {damaged.split('/')[-1]}" in _error_line(named) or \
        f"--resume {newest}: damaged checkpoint: unet/" in _error_line(named)

    for resume in ("auto", "latest"):
        shutil.rmtree(output / "checkpoint-00004", ignore_errors=True)
        shutil.copytree(output / "checkpoint-00002", output / "checkpoint-00004")  # placeholder, damaged below
        _truncate(output / "checkpoint-00004" / damaged)
        done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", resume)
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
        assert f"--resume {resume}: skipped checkpoint-00004, damaged: " in done.stderr
        assert f"resumed from {output / 'checkpoint-00002'} at step 2" in done.stderr
        # the resume past the damage ends where the unbroken run ended
        for name, tensor in whole_final.items():
            torch.testing.assert_close(_unet(output)[name], tensor, rtol=0, atol=0)


def test_a_newest_checkpoint_without_its_training_state_is_named_when_resume_passes_over_it(tiny_sd_model,
                                                                                          cached_dataset, tmp_path):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2").returncode == 0
    (output / "checkpoint-00004" / "training_state.pt").unlink()  # a copy cut short, a file deleted by hand
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", "auto")
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert "--resume auto: skipped checkpoint-00004, damaged: no training_state.pt" in done.stderr
    assert f"resumed from {output / 'checkpoint-00002'} at step 2" in done.stderr
    assert (output / "checkpoint-00004" / "training_state.pt").exists()  # saved again, whole


def _rewrite(path: Path, data: bytes) -> None:
    """Other bytes under the name, as a new file: the final model's hard link keeps the old ones."""
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("edit", ["emptied", "a key deleted"])
def test_a_unet_config_that_parses_but_does_not_match_its_weights_is_damage_resume_passes_over(
        tiny_sd_model, cached_dataset, tmp_path, edit):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2").returncode == 0
    whole_final = _unet(output)
    newest = output / "checkpoint-00004"
    config_file = newest / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config["cross_attention_dim"]  # diffusers then builds its default width, not the weights'
    _rewrite(config_file, b"{}" if edit == "emptied" else json.dumps(config).encode())

    named = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", str(newest))
    assert named.returncode == ExitStatus.REFUSED, named.stderr[-3000:]
    assert (f"--resume {newest}: damaged checkpoint: unet/config.json does not match the weights beside it"
            in _error_line(named))

    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", "auto")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert ("--resume auto: skipped checkpoint-00004, damaged: unet/config.json does not match the weights "
            "beside it") in done.stderr
    assert f"resumed from {output / 'checkpoint-00002'} at step 2" in done.stderr
    for name, tensor in whole_final.items():
        torch.testing.assert_close(_unet(output)[name], tensor, rtol=0, atol=0)


def test_unet_weights_that_pass_the_check_but_do_not_load_are_refused_in_one_line(tiny_sd_model, cached_dataset,
                                                                                  tmp_path):
    """The check reads headers and lengths, not every field: a header whose tensor types were garbled keeps
    its length and names, and only the load finds it. That load is turned into one line too."""
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2").returncode == 0
    newest = output / "checkpoint-00002"
    weights = newest / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert b'"F32"' in data[:header_end]
    _rewrite(weights, data[:header_end].replace(b'"F32"', b'"F3X"') + data[header_end:])
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", str(newest))
    assert done.returncode == ExitStatus.REFUSED, done.stderr[-3000:]
    assert f"--resume {newest}: its UNet does not load (" in _error_line(done)
    assert not (output / "checkpoint-00004").exists()


@pytest.mark.parametrize("kind, damaged", [("lora", "pytorch_lora_weights.safetensors"),
                                           ("loha", "unet_adapter/adapter_model.safetensors")])
def test_a_damaged_adapter_in_the_newest_checkpoint_is_skipped_by_resume_and_refused_when_named(
        tiny_sd_model, cached_dataset, tmp_path, kind, damaged):
    output = tmp_path / "run"
    adapter = ("--lora_type", kind, "--lora_rank", "2")
    assert _train(tiny_sd_model, cached_dataset, output, *adapter, "--max_steps", "4", "--save_steps", "2").returncode == 0
    whole_final = load_file(output / damaged)
    newest = output / "checkpoint-00004"
    _truncate(newest / damaged)

    named = _train(tiny_sd_model, cached_dataset, output, *adapter, "--max_steps", "4", "--resume", str(newest))
    assert named.returncode == ExitStatus.REFUSED
    assert f"--resume {newest}: damaged checkpoint: {damaged} is damaged" in _error_line(named)

    done = _train(tiny_sd_model, cached_dataset, output, *adapter, "--max_steps", "4", "--resume", "auto")
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert f"--resume auto: skipped checkpoint-00004, damaged: {damaged} is damaged" in done.stderr
    assert f"resumed from {output / 'checkpoint-00002'} at step 2" in done.stderr
    resumed = load_file(output / damaged)  # the final adapter: the unbroken run's
    assert resumed.keys() == whole_final.keys()
    assert all(torch.equal(resumed[name], whole_final[name]) for name in whole_final)


def test_a_folder_whose_every_checkpoint_is_damaged_is_refused_in_one_line(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2").returncode == 0
    _truncate(output / "checkpoint-00002" / "training_state.pt")
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--resume", "auto")
    assert done.returncode == ExitStatus.REFUSED
    assert f"--resume auto: every checkpoint in {output} is damaged" in _error_line(done)


# -- two runs in one folder ---------------------------------------------------------------------------------------

def test_a_second_run_in_a_held_output_folder_is_refused_naming_the_holder_and_a_killed_run_leaves_no_lock(
        tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    first = _start(tiny_sd_model, cached_dataset, output, "--max_steps", "100000", "--resume", "auto")
    try:
        _wait_for(output / "tensorboard", first)
        for resume in (["--resume", "auto"], []):  # a requeued job; a fresh start at the same time
            second = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", *resume)
            assert second.returncode == ExitStatus.REFUSED
            assert (f"--output_dir {output} is in use by another run (pid {first.pid} on host "
                    f"{socket.gethostname()}") in _error_line(second)
        assert first.poll() is None  # the first trains on, untouched
        assert not list(output.glob("checkpoint-*")) and not (output / "train_summary.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)  # killed: the OS drops its lock
        first.communicate(timeout=60)
    after = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2", "--resume", "auto")
    assert after.returncode == ExitStatus.FINISHED, after.stderr[-3000:]
    assert json.loads((output / "train_summary.json").read_text())["steps"] == 2


def _torchrun(model, data, output, *extra, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_command(model, data, output, *extra)[1:]]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_two_process_run_is_refused_from_a_held_folder(tiny_sd_model, cached_dataset, tmp_path):
    """(That a two-process run in a free folder takes its lock once: test_trainer's two-process run; that a
    training run holds it: the test above.) Here this process holds the folder, as a run does."""
    from cachetrain.train.run_lock import LOCK_FILE, RunLock

    output = tmp_path / "run"
    output.mkdir()
    lock = RunLock.take(output)
    try:
        refused = _torchrun(tiny_sd_model, cached_dataset, output, "--max_steps", "2", "--resume", "auto")
        assert (output / LOCK_FILE).read_text().split()[0] == str(os.getpid())  # still this process's
    finally:
        lock.release()
    assert refused.returncode != 0  # torchrun's own status for a failed process (the main one exits 2)
    holder = f"--output_dir {output} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}"
    assert [line for line in refused.stderr.splitlines() if holder in line] == [f"error: {holder}, holding "
            ".run.lock); wait for it to end, stop it, or choose another --output_dir"]  # one line, the main process's
    assert not list(output.glob("checkpoint-*")) and not (output / "train_summary.json").exists()


# -- a second signal ----------------------------------------------------------------------------------------------

def test_a_second_signal_stops_at_once_without_a_checkpoint_naming_the_newest_with_its_own_status(
        tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    # a checkpoint every 2 steps, so there is a newest one to name
    process = _start(tiny_sd_model, cached_dataset, output, "--max_steps", "100000", "--save_steps", "2")
    _wait_for(output / "checkpoint-00002", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the user again, before the stop's checkpoint
    started = time.monotonic()
    out, _ = process.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert "Traceback" not in out, out[-3000:]
    assert process.returncode == ExitStatus.STOPPED_NOW, out[-3000:]
    assert "SIGINT received: saving a checkpoint at the next step" in out
    newest = max(output.glob("checkpoint-*"))
    assert f"SIGTERM again: stopping now without a checkpoint; the newest is {newest} (continue with --resume)" in out
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["exit_status"] == ExitStatus.STOPPED_NOW and summary["stopped_now_by"] == "SIGTERM"
    assert summary["interrupted"] and not summary["final_model_saved"]
    assert not list(output.glob("*.partial")) and not (output / "model_index.json").exists()


# Both signals sent once a mid-run checkpoint is recorded as saved (the wrapper below, around that record), while
# the run goes on to its next step: where a user's Ctrl-C and a second signal land in most of a run's time.
_SIGNALS_AFTER_A_MID_RUN_SAVE = """
import os, signal, sys
from cachetrain import commands
from cachetrain.train.save_policy import SavePolicy

real_record = SavePolicy.record

def record(self, step, reason, failed):
    real_record(self, step, reason, failed)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)

SavePolicy.record = record
sys.exit(commands.train_from_cached(sys.argv[1:]))
"""


def test_a_second_signal_just_after_a_mid_run_checkpoint_names_it_as_the_newest_not_as_the_final_models(
        tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _SIGNALS_AFTER_A_MID_RUN_SAVE,
                           *_command(tiny_sd_model, cached_dataset, output, "--max_steps", "100000",
                                     "--save_steps", "2")[2:]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    assert done.returncode == ExitStatus.STOPPED_NOW, out[-3000:]
    assert (f"SIGTERM again: stopping now without a checkpoint; the newest is {output / 'checkpoint-00002'} "
            "(continue with --resume)") in out
    assert "final model" not in out, out[-3000:]
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["exit_status"] == ExitStatus.STOPPED_NOW
    assert not (output / "model_index.json").exists()


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_set_up_stops_the_start_in_one_line_with_the_stopped_status_leaving_nothing_half_written(
        tiny_sd_model, cached_dataset, tmp_path, sent):
    output = tmp_path / "run"
    process = _start(tiny_sd_model, cached_dataset, output, "--max_steps", "100000", "--save_steps", "2")
    _wait_for(output / ".run.lock", process, seconds=120)  # taken as set-up begins: the model is not loaded yet
    process.send_signal(sent)
    out, _ = process.communicate(timeout=120)
    assert "Traceback" not in out, out[-3000:]
    assert process.returncode == ExitStatus.STOPPED, out[-3000:]
    assert (f"{sent.name} received before step 1: stopped during set-up; nothing was trained or saved, so the same "
            "command starts it again") in out
    assert not list(output.glob("checkpoint-*")) and not (output / "train_summary.json").exists()
    assert not list(output.glob("*.partial")) and not list(output.glob(".*.partial-*"))
    again = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2")  # the same command, as said
    assert again.returncode == ExitStatus.FINISHED, again.stderr[-3000:]


# A stop raised where Python can only print it: in a weakref callback, as in the import lock's (diffusers imports
# its modules as they are first used). Sent from inside such a callback as the run's data or its UNet is loaded;
# accelerate's prepare, where the processes meet after the load, says when it is reached.
_SIGNAL_SWALLOWED_IN_SET_UP = """
import os, signal, sys, weakref
import accelerate
from cachetrain import commands
from cachetrain.models import loading
from cachetrain.train import trainer

class Held:
    pass

def swallowing_a_signal(load):
    def swallowing(*args, **kwargs):
        held = Held()
        reference = weakref.ref(held, lambda gone: os.kill(os.getpid(), signal.SIGTERM))
        del held  # the callback runs, the handler raises in it, and Python prints "Exception ignored in"
        return load(*args, **kwargs)
    return swallowing

if sys.argv[1] == "data":
    trainer.load_run_data = swallowing_a_signal(trainer.load_run_data)
else:
    loading.load_unet = swallowing_a_signal(loading.load_unet)
real_prepare = accelerate.Accelerator.prepare

def prepare(self, *args, **kwargs):
    print("[test] the processes meet in prepare", file=sys.stderr)
    return real_prepare(self, *args, **kwargs)

accelerate.Accelerator.prepare = prepare
sys.exit(commands.train_from_cached(sys.argv[2:]))
"""


@pytest.mark.parametrize("swallowed_in", ["data", "unet"])
def test_a_set_up_stop_that_python_swallows_still_ends_the_start_before_the_processes_meet_again(
        tiny_sd_model, cached_dataset, tmp_path, swallowed_in):
    """Under torchrun one process went on alone into the next rendezvous and waited there until the
    launcher killed it, 30 s later; alone, it trained a step and saved a checkpoint."""
    output = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _SIGNAL_SWALLOWED_IN_SET_UP, swallowed_in,
                           *_command(tiny_sd_model, cached_dataset, output, "--max_steps", "100000",
                                     "--save_steps", "2")[2:]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert "Exception ignored in" in done.stderr  # the swallowing is real
    assert "the processes meet in prepare" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == ExitStatus.STOPPED, done.stderr[-3000:]
    assert ("SIGTERM received before step 1: stopped during set-up; nothing was trained or saved, so the same "
            "command starts it again") in done.stderr
    assert not list(output.glob("checkpoint-*")) and not (output / "train_summary.json").exists()
    assert not list(output.glob("*.partial")) and not list(output.glob(".*.partial-*"))


# The signals are sent from inside the publishing of the final model (the wrapper below, around the step that
# links each of its parts), the one way to land them there every time: a tiny model publishes in a millisecond.
# Everything else is train_from_cached.py's own code, in a process of its own.
_SIGNALS_WHILE_PUBLISHING = """
import os, signal, sys
from cachetrain import commands
from cachetrain.train import checkpoint

signals, real_link_tree, calls = sys.argv[1].split(","), checkpoint.link_tree, []

def link_tree(source, destination, own_copies=False):
    if own_copies:  # a part of the final model: send the next signal, then publish the part
        calls.append(destination)
        if len(calls) <= len(signals):
            os.kill(os.getpid(), getattr(signal, signals[len(calls) - 1]))
    return real_link_tree(source, destination, own_copies)

checkpoint.link_tree = link_tree
sys.exit(commands.train_from_cached(sys.argv[2:]))
"""


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGINT", "SIGINT,SIGTERM"])
def test_a_signal_while_the_final_model_is_published_never_leaves_half_of_one(tiny_sd_model, cached_dataset,
                                                                              tmp_path, signals):
    output = tmp_path / "run"
    flags = ("--max_steps", "2")
    done = subprocess.run([sys.executable, "-c", _SIGNALS_WHILE_PUBLISHING, signals,
                           *_command(tiny_sd_model, cached_dataset, output, *flags)[2:]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out[-3000:]
    assert f"saved {output / 'checkpoint-00002'} (final)" in out
    summary = json.loads((output / "train_summary.json").read_text())
    first = signals.split(",")[0]
    assert f"{first} received while the final model is written: finishing it, then the run ends" in out
    if signals.count(",") == 0:  # one signal: the final model is finished, and written it is the run's success
        assert done.returncode == ExitStatus.FINISHED, out[-3000:]
        assert summary["exit_status"] == ExitStatus.FINISHED and summary["final_model_saved"]
        assert (output / "model_index.json").exists()
        assert torch.equal(_unet(output)["conv_in.weight"], _unet(output / "checkpoint-00002")["conv_in.weight"])
        return
    # a second: out at once, no final model rather than half of one, and --resume auto writes it
    assert done.returncode == ExitStatus.STOPPED_NOW, out[-3000:]
    assert (f"SIGTERM again: stopping now without the final model; its checkpoint is {output / 'checkpoint-00002'} "
            "(--resume auto writes the final model from it)") in out
    assert summary["exit_status"] == ExitStatus.STOPPED_NOW and not summary["final_model_saved"]
    published = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert not published & {path.name for path in output.iterdir()}, sorted(path.name for path in output.iterdir())
    again = _train(tiny_sd_model, cached_dataset, output, *flags, "--resume", "auto")
    assert again.returncode == ExitStatus.FINISHED, again.stderr[-3000:]
    assert "checkpoint-00002 is at step 2, the end of this run: nothing to train" in again.stderr
    assert published <= {path.name for path in output.iterdir()}
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["exit_status"] == ExitStatus.FINISHED and summary["final_model_saved"]


# A SIGKILL cannot be caught: it is sent from inside the publishing of the final model's first part, over the
# final model of an earlier run of the same folder (the run is taken on from step 2 to 4).
_KILLED_WHILE_PUBLISHING = """
import os, signal, sys
from cachetrain import commands
from cachetrain.train import checkpoint

real_link_tree = checkpoint.link_tree

def link_tree(source, destination, own_copies=False):
    if own_copies:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_link_tree(source, destination, own_copies)

checkpoint.link_tree = link_tree
sys.exit(commands.train_from_cached(sys.argv[1:]))
"""


def test_a_sigkill_while_the_final_model_is_published_leaves_no_model_index_and_resume_auto_publishes_it(
        tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2").returncode == ExitStatus.FINISHED
    assert (output / "model_index.json").exists()
    flags = ("--max_steps", "4", "--resume", "auto")
    done = subprocess.run([sys.executable, "-c", _KILLED_WHILE_PUBLISHING,
                           *_command(tiny_sd_model, cached_dataset, output, *flags)[2:]],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.stdout + done.stderr)[-3000:]
    assert (output / "checkpoint-00004" / "model_index.json").exists()
    # the step-2 model is partly replaced: the file every loader starts from is gone, so nothing looks whole
    assert not (output / "model_index.json").exists()
    again = _train(tiny_sd_model, cached_dataset, output, *flags)
    assert again.returncode == ExitStatus.FINISHED, again.stderr[-3000:]
    assert "checkpoint-00004 is at step 4, the end of this run: nothing to train" in again.stderr
    assert (output / "model_index.json").exists()
    assert torch.equal(_unet(output)["conv_in.weight"], _unet(output / "checkpoint-00004")["conv_in.weight"])


# -- a resume of a finished run -----------------------------------------------------------------------------------

def test_resume_auto_of_a_finished_run_trains_and_saves_nothing_and_keeps_its_summary(tiny_sd_model, cached_dataset,
                                                                                     tmp_path):
    output = tmp_path / "run"
    assert _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2").returncode == 0
    summary = (output / "train_summary.json").read_text()
    last = output / "checkpoint-00004" / "unet" / "diffusion_pytorch_model.safetensors"
    inode = last.stat().st_ino
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--save_steps", "2", "--resume", "auto")
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-3000:]
    assert "checkpoint-00004 is at step 4, the end of this run: nothing to train" in done.stderr
    assert (output / "train_summary.json").read_text() == summary
    assert json.loads(summary)["checkpoints"][-2:] == [str(output / "checkpoint-00002"), str(output / "checkpoint-00004")]
    assert last.stat().st_ino == inode  # not saved again


# -- flags accepted only to fail later ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--noise_offset", "nan"), ("--learning_rate", "inf"),
                                         ("--noise_gamma", "inf")])
def test_a_non_finite_number_flag_is_refused_at_start(tiny_sd_model, cached_dataset, tmp_path, flag, value):
    output = tmp_path / "run"
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "2", flag, value)
    assert done.returncode == ExitStatus.REFUSED
    assert f"{flag} {float(value)}: must be a finite number" in done.stderr
    assert "Traceback" not in done.stderr and not list(output.glob("checkpoint-*"))


def test_a_warm_up_with_the_constant_schedule_is_said_and_done(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    done = _train(tiny_sd_model, cached_dataset, output, "--max_steps", "4", "--scheduler", "constant",
                  "--warmup_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--scheduler constant with --warmup_steps 2: the LR rises over the warm-up" in done.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [event.value for event in events.Scalars("train/learning_rate")]
    assert rates[0] < rates[-1] and rates[-2] == rates[-1] == pytest.approx(1e-3)


def test_export_of_a_folder_missing_its_vae_names_the_missing_part(tiny_sd_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_model, model)
    shutil.rmtree(model / "vae")
    done = run_script("-m", "cachetrain.export", str(model), str(tmp_path / "out.safetensors"))
    assert done.returncode == 2
    assert f"{model}: its model_index.json names the part 'vae', but {model / 'vae'}/ is missing" in _error_line(done)
    assert not (tmp_path / "out.safetensors").exists()
