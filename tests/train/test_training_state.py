"""A checkpoint's training state (cachetrain.train.training_state.TrainingState): what training_state.pt holds,
its format version, old checkpoints still resuming exactly, newer ones refused in one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachetrain.train.config import parse_train_args
from cachetrain.train.training_state import (TRAINING_STATE_FORMAT, Progress, TrainingState, TrainingStateError,
                                       optimizer_identity)
from tests.script_runs import run_script

# the keys the trainer wrote before the format was recorded (and still writes, beside "format")
KEYS_BEFORE_THE_FORMAT = {"optimizer", "lr_schedule", "rng", "progress", "data", "optimizer_identity", "config", "ema"}


def _args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", *extra]


def _tiny_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return model, optimizer, schedule


def _capture(model, optimizer, schedule, ema=None) -> TrainingState:
    return TrainingState.capture(progress=Progress(step=3, epoch=1, batch_in_epoch=2), optimizer=optimizer,
                                 lr_schedule=schedule, data={"pairs": 10, "seed": 0},
                                 optimizer_identity=optimizer_identity("adamw", model, list(model.parameters())),
                                 config={"optimizer": "adamw", "seed": 0}, ema=ema)


def test_a_training_state_round_trips_through_its_file_with_its_format(tmp_path):
    model, optimizer, schedule = _tiny_training()
    state = _capture(model, optimizer, schedule)
    torch.save(state.to_dict(), tmp_path / "training_state.pt")
    saved = torch.load(tmp_path / "training_state.pt", weights_only=True)  # plain types only
    assert saved["format"] == TRAINING_STATE_FORMAT
    assert set(saved) == (KEYS_BEFORE_THE_FORMAT - {"ema"}) | {"format"}  # no EMA: no "ema" key
    read = TrainingState.from_dict(saved, tmp_path)
    assert read.progress == Progress(step=3, epoch=1, batch_in_epoch=2)
    assert read.data == {"pairs": 10, "seed": 0} and json.loads(read.config) == {"optimizer": "adamw", "seed": 0}
    assert read.optimizer_identity == state.optimizer_identity and read.ema is None
    assert read.lr_schedule == schedule.state_dict()
    moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(read.optimizer["state"][0]["exp_avg"], moments)


def test_apply_puts_the_optimizer_schedule_and_random_generators_back(tmp_path):
    model, optimizer, schedule = _tiny_training()
    torch.save(_capture(model, optimizer, schedule).to_dict(), tmp_path / "training_state.pt")  # as a save does
    state = TrainingState.from_dict(torch.load(tmp_path / "training_state.pt", weights_only=True), tmp_path)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    rate = schedule.get_last_lr()
    for _ in range(2):  # the run goes on after the save
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr() != rate
    progress = state.apply(optimizer, schedule)
    assert progress == state.progress and progress is not state.progress
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert schedule.get_last_lr() == rate
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_a_state_written_before_the_format_and_the_optimizer_identity_reads_its_optimizer_from_its_flags(tmp_path):
    model, optimizer, schedule = _tiny_training()
    old = _capture(model, optimizer, schedule).to_dict()
    del old["format"], old["optimizer_identity"]
    old["config"] = json.dumps({"optimizer": "lion"})
    read = TrainingState.from_dict(old, tmp_path)
    assert read.optimizer_identity == {"optimizer": "lion"}
    problem = read.resume_problem({"pairs": 10, "seed": 0}, {"optimizer": "adamw", "trainable_tensors": 2}, tmp_path)
    assert problem.startswith(f"--resume {tmp_path}: optimizer was lion, now adamw; its optimizer state cannot continue")


def test_a_state_of_a_newer_format_is_refused_naming_the_checkpoint(tmp_path):
    model, optimizer, schedule = _tiny_training()
    newer = {**_capture(model, optimizer, schedule).to_dict(), "format": TRAINING_STATE_FORMAT + 1}
    with pytest.raises(TrainingStateError) as refused:
        TrainingState.from_dict(newer, tmp_path / "checkpoint-00007")
    message = str(refused.value)
    assert message.startswith(f"--resume {tmp_path / 'checkpoint-00007'}: its training state is format "
                              f"{TRAINING_STATE_FORMAT + 1}, newer than this cachetrain reads")
    assert "\n" not in message


def test_a_checkpoint_saved_before_the_format_was_recorded_resumes_exactly(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.train.trainer import train

    common = ("--batch_size", "8", "--max_steps", "4", "--save_steps", "2", "--log_every", "1", "--ema_decay", "0.9")
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    checkpoint = tmp_path / "straight" / "checkpoint-00002"
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert set(state) == KEYS_BEFORE_THE_FORMAT | {"format"}
    torch.save({key: state[key] for key in KEYS_BEFORE_THE_FORMAT}, checkpoint / "training_state.pt")  # the old shape
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                           "--resume", str(checkpoint))))
    assert resumed.steps == 4
    losses = [(entry["step"], entry["train/loss"]) for entry in straight.logged if "train/loss" in entry]
    assert [(entry["step"], entry["train/loss"]) for entry in resumed.logged if "train/loss" in entry] == losses[2:]
    for component in ("unet", "unet_ema"):
        a = load_file(tmp_path / "straight" / "checkpoint-00004" / component / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "resumed" / "checkpoint-00004" / component / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[name], b[name]) for name in a), component


def test_the_script_refuses_a_checkpoint_of_a_newer_format_in_one_line(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.train.trainer import train

    output = tmp_path / "run"
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8", "--max_steps", "1")))
    state_file = output / "checkpoint-00001" / "training_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "format": TRAINING_STATE_FORMAT + 1}, state_file)
    done = run_script("train_from_cached.py", *_args(tiny_sd_model, cached_dataset, output, "--batch_size", "8",
                                                     "--max_steps", "2", "--resume"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume {output / 'checkpoint-00001'}: its training state is format "
                      f"{TRAINING_STATE_FORMAT + 1}, newer than this cachetrain reads (up to {TRAINING_STATE_FORMAT}); "
                      "resume it with the version that wrote it, or start a new run from its weights with "
                      "--pretrained_model"]
    assert not (output / "checkpoint-00002").exists()
