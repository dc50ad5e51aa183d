"""The trainer's numerics, accumulation, resume, precision, selections and safety, on the tiny model.

Expected values are computed here directly (from the scheduler's alphas, from parameter names),
not with the trainer's own helpers.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachetrain.config import parse_train_args
from cachetrain.trainer import TrainingError, check_process_count, main, train
from tests.training_support import train_caption_probe

REPO = Path(__file__).resolve().parents[1]


def _args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", *extra]


def _unet_weights(folder: Path, component: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


def _logged(result, name: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[name]) for entry in result.logged if name in entry]


# ---------------------------------------------------------------------------------------------
# The objective


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_and_min_snr_weights_equal_a_direct_computation(tiny_sd_model, prediction_type):
    from diffusers import DDPMScheduler

    from cachetrain.objective import DiffusionObjective

    scheduler = DDPMScheduler.from_pretrained(tiny_sd_model, subfolder="scheduler", prediction_type=prediction_type)
    objective = DiffusionObjective(scheduler, snr_gamma=5.0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 200, 500, 800, 999])
    prediction = torch.randn(6, 4, 8, 8, generator=generator)

    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    noisy = a * latents.double() + s * noise.double()
    target = noise.double() if prediction_type == "epsilon" else a * noise.double() - s * latents.double()
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = (prediction.double() - target).square().mean(dim=(1, 2, 3))

    torch.testing.assert_close(objective.add_noise(latents, noise, timesteps).double(), noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(objective.target(latents, noise, timesteps).double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(objective.loss_weights(timesteps).double(), weights, rtol=1e-5, atol=1e-7)
    loss, raw = objective.losses(prediction, objective.target(latents, noise, timesteps), timesteps)
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)
    assert raw.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_noise_is_a_function_of_seed_epoch_and_sample_only():
    from cachetrain.objective import draw_sample_noise, sample_key

    first = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 1, 17))
    again = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 1, 17))
    other_epoch = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 2, 17))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other_epoch[0])


def test_each_process_takes_a_disjoint_equal_share_of_every_epoch():
    from cachetrain.loader import epoch_batches

    shares = [epoch_batches(50, 4, seed=1, epoch=3, rank=r, world_size=2) for r in range(2)]
    flat = [sorted(i for batch in share for i in batch) for share in shares]
    assert len(shares[0]) == len(shares[1]) == 6  # 25 per process -> 6 full batches of 4
    assert not set(flat[0]) & set(flat[1])
    assert epoch_batches(50, 4, 1, 3, 0, 2) == shares[0]  # same seed and epoch -> same order
    assert epoch_batches(50, 4, 1, 4, 0, 2) != shares[0]


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
                                       ["--optimizer", "adamw", "--bf16_weights"]], ids=" ".join)
def test_a_stopped_and_resumed_run_equals_one_that_never_stopped(tiny_sd_model, cached_dataset, tmp_path, precision):
    # 48 pairs, batch 4, accumulation 2: 6 optimizer steps per epoch. The stop arrives after 7
    # micro-batches, in the middle of step 4's accumulation: the run finishes step 4, then saves.
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
    from cachetrain import checkpoint

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


@pytest.mark.parametrize("flag", ["--channels_last", "--compile"])  # --compile: ~90 s on a CPU, cold
def test_speed_flags_train_the_same_model(tiny_sd_model, cached_dataset, tmp_path, flag, monkeypatch):
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    layouts = []  # per UNet call: are its input and first convolution's weight channels-last?
    unet_forward = UNet2DConditionModel.forward

    def recording_forward(unet, sample, *args, **kwargs):
        layouts.append((sample.is_contiguous(memory_format=torch.channels_last),
                        unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
        return unet_forward(unet, sample, *args, **kwargs)

    if flag == "--channels_last":
        monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    common = ("--batch_size", "8", "--max_steps", "3", "--log_every", "1")
    plain = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "plain", *common)))
    plain_layouts, layouts[:] = list(layouts), []
    counters.clear()
    fast = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "fast", *common, flag)))
    # the flag did take effect
    if flag == "--channels_last":
        assert set(plain_layouts) == {(False, False)} and set(layouts) == {(True, True)}
    else:
        assert counters["stats"]["unique_graphs"] >= 1  # the UNet went through torch.compile
    plain_losses, fast_losses = _logged(plain, "train/loss"), _logged(fast, "train/loss")
    assert [step for step, _ in fast_losses] == [1, 2, 3]
    assert [value for _, value in fast_losses] == pytest.approx([value for _, value in plain_losses], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Precision, optimizers, safety


def test_stochastic_rounding_keeps_updates_that_round_to_nearest_would_lose():
    from cachetrain.optim import stochastic_round_to_bf16_

    weights = torch.ones(200_000)
    tiny_update = 1e-3  # below bf16's resolution at 1.0 (2^-7): round-to-nearest drops it
    assert torch.equal((weights + tiny_update).to(torch.bfloat16).float(), weights)
    rounded = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(rounded, weights + tiny_update)
    assert rounded.float().mean().item() - 1.0 == pytest.approx(tiny_update, rel=0.05)
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0078125}


def test_bf16_optimizer_state_keeps_changes_below_its_resolution():
    from cachetrain.optim import StochasticAdamW

    parameter = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    optimizer = StochasticAdamW([parameter], lr=0.0, betas=(0.9, 0.999))
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # second moment = 0.001
    parameter.grad = torch.zeros_like(parameter)
    for _ in range(100):  # each step shrinks it by 0.1%, under half of bf16's spacing there
        optimizer.step()
    second_moment = optimizer.state[parameter]["exp_avg_sq"].float().mean().item()
    assert second_moment == pytest.approx(0.001 * 0.999 ** 100, rel=0.01)  # round-to-nearest stays at 0.001


def test_own_optimizers_match_the_reference_implementations_in_fp32(monkeypatch):
    from lion_pytorch import Lion

    from cachetrain import optim
    from cachetrain.optim import StochasticAdamW, StochasticLion

    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 1000)  # several chunks, one of them a single tensor
    # conv weights in channels-last, as --channels_last makes them; one gets gradients of another layout
    shapes = [(40, 30), (7,), (3, 5, 2, 2), (1200,), (9, 9), (6, 4, 3, 3), (5, 3, 3, 3)]
    layouts = [torch.contiguous_format] * 5 + [torch.channels_last] * 2
    grad_layouts = layouts[:-1] + [torch.contiguous_format]
    for reference_class, own_class in ((torch.optim.AdamW, StochasticAdamW), (Lion, StochasticLion)):
        generator = torch.Generator().manual_seed(1)
        starts = [torch.randn(shape, generator=generator).contiguous(memory_format=layout)
                  for shape, layout in zip(shapes, layouts)]
        references = [torch.nn.Parameter(start.clone()) for start in starts]
        owns = [torch.nn.Parameter(start.clone()) for start in starts]
        reference_opt = reference_class(references, lr=1e-2, weight_decay=0.1)
        own_opt = own_class(owns, lr=1e-2, weight_decay=0.1)
        for step in range(4):
            for reference, own, layout in zip(references, owns, grad_layouts):
                grad = torch.randn(reference.shape, generator=generator).contiguous(memory_format=layout)
                reference.grad, own.grad = grad.clone(), grad.clone()
            reference_opt.step()
            own_opt.step()
        for reference, own in zip(references, owns):
            torch.testing.assert_close(own.data, reference.data, rtol=1e-5, atol=1e-6)


def test_bf16_weights_train_in_bf16_and_lower_the_loss(tiny_sd_model, cached_dataset, tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--bf16_weights",
                                          "--batch_size", "8", "--max_steps", "24", "--log_every", "6")))
    losses = [value for _, value in _logged(result, "train/loss")]
    assert losses[-1] < 0.6 * losses[0], losses
    weights = _unet_weights(tmp_path / "run")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8"])  # skipped on the device / on the host
def test_nan_gradients_skip_the_step_and_are_counted(tiny_sd_model, cached_dataset, tmp_path, optimizer):
    from cachetrain.sidecar import read_metadata, write_sidecar

    # finite but huge, so the loader lets it through (NaN/Inf latents are bad data, skipped in the
    # worker); the UNet's activations overflow and the gradients come out NaN/Inf
    poisoned = sorted(cached_dataset.rglob("*.img_sdvae"))[0]
    write_sidecar(poisoned, {"latent": torch.full((4, 16, 16), 3e38)}, read_metadata(poisoned))
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "12", "--log_every", "12", "--optimizer", optimizer)))
    skipped = _logged(result, "train/skipped_steps")
    assert skipped == [(12, 2.0)]  # the poisoned sample is in one batch per epoch; 2 epochs
    weights = _unet_weights(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_run_of_bad_steps_is_seen_even_when_a_good_step_ends_it_before_logging():
    from cachetrain.telemetry import StepHealth

    health = StepHealth(torch.device("cpu"))
    for bad in [0, 1, 1, 1, 1, 0, 1, 0]:
        health.record(found_inf=torch.tensor(float(bad)), grad_norm=torch.tensor(1.0))
    scalars = health.window_scalars()
    assert scalars["_worst_bad_run"].item() == 4
    assert scalars["train/skipped_steps"].item() == 5


def test_a_run_of_bad_steps_stops_with_a_clear_message(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.sidecar import read_metadata, write_sidecar

    for path in cached_dataset.rglob("*.img_sdvae"):
        write_sidecar(path, {"latent": torch.full((4, 16, 16), 3e38)}, read_metadata(path))  # finite: not bad data
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row had NaN/Inf gradients"):
        train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                     "--max_steps", "20", "--log_every", "3", "--max_bad_steps", "3")))


# ---------------------------------------------------------------------------------------------
# Schedules, validation, caption dropout


def test_learning_rate_decay_subtracts_once_per_epoch(tiny_sd_model, cached_dataset, tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "3e", "--log_every", "1", "--learning_rate_decay", "1e-4")))
    rates = dict(_logged(result, "train/learning_rate"))
    assert result.steps == 18  # 6 steps per epoch
    assert rates[6] == pytest.approx(1e-3) and rates[7] == pytest.approx(9e-4) and rates[13] == pytest.approx(8e-4)


def test_validation_loss_uses_fixed_noise_so_equal_weights_give_equal_values(tiny_sd_model, cached_dataset, tmp_path):
    runs = [train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / name, "--batch_size", "8",
                                         "--max_steps", "4", "--validation_split", "0.25",
                                         "--validation_steps", "2", "--seed", seed)))
            for name, seed in (("a", "0"), ("b", "0"))]
    values = [_logged(run, "val/loss") for run in runs]
    assert [step for step, _ in values[0]] == [0, 2, 4]
    assert values[0] == values[1]
    assert values[0][-1][1] < values[0][0][1]  # training lowers the held-out loss


def test_caption_dropout_swaps_in_the_data_roots_empty_prompt(cached_dataset):
    from cachetrain.loader import CachedPairDataset, NoisePlan
    from cachetrain.objective import draw_sample_noise, sample_key
    from cachetrain.sidecar import read_sidecar
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    empty = read_sidecar(cached_dataset / ".empty_prompt.txt_clipl", "emb")
    dataset = CachedPairDataset(index, NoisePlan(seed=5, caption_dropout=0.5,
                                                 empty_embeddings=[empty]))
    dropped = 0
    for i in range(len(dataset)):
        emb = dataset[i][1]
        expect_drop = draw_sample_noise((4, 16, 16), 0.0, sample_key(5, 0, i))[2] < 0.5
        own = read_sidecar(index[i][1], "emb")
        assert torch.equal(emb, empty if expect_drop else own)
        dropped += expect_drop
    assert 0 < dropped < len(dataset)


# ---------------------------------------------------------------------------------------------
# Layer selections


def _names(unet, pattern: str) -> set[str]:
    return {name for name, _ in unet.named_parameters() if re.search(pattern, name)}


@pytest.mark.parametrize("flags, pattern", [
    (["--unfreeze_attention"], r"\.attn[12]\."),
    (["--unfreeze_up_blocks", "1"], r"^up_blocks\.1\."),
    (["--unfreeze_down_blocks", "0", "1"], r"^down_blocks\.[01]\."),
    (["--unfreeze_mid_block"], r"^mid_block\."),
    (["--reinit_qk"], r"\.to_[qk]\.weight$"),
    (["--reinit_crossattn"], r"\.attn2\."),
    (["--reinit_attention"], r"\.attn[12]\."),
    (["--unfreeze_up_blocks", "0", "--unfreeze_mid_block"], r"^(up_blocks\.0|mid_block)\."),
])
def test_targetted_training_trains_exactly_the_selected_parameters(tiny_sd_model, flags, pattern):
    from diffusers import UNet2DConditionModel

    from cachetrain.layers import apply_layer_selection
    from cachetrain.layers import layer_selection as _layer_selection

    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--targetted_training", *flags])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    expected = _names(unet, pattern)
    assert expected
    trainable = apply_layer_selection(unet, _layer_selection(config), seed=0)
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == expected
    assert len(trainable) == len(expected)


def test_reinit_qk_changes_only_query_and_key_weights_reproducibly(tiny_sd_model):
    from diffusers import UNet2DConditionModel

    from cachetrain.layers import LayerSelection, apply_layer_selection

    original = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet").state_dict()
    results = []
    for _ in range(2):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
        apply_layer_selection(unet, LayerSelection(reinit_qk=True), seed=3)
        results.append(unet.state_dict())
    changed = {name for name in original if not torch.equal(original[name], results[0][name])}
    assert changed == {name for name in original if re.search(r"\.attn[12]\.to_[qk]\.weight$", name)}
    assert all(torch.equal(results[0][name], results[1][name]) for name in original)


def test_trainable_parameter_count_is_printed_at_start(tiny_sd_model, cached_dataset, tmp_path, capsys):
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--targetted_training", "--unfreeze_mid_block")))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    mid = sum(p.numel() for name, p in unet.named_parameters() if name.startswith("mid_block."))
    total = sum(p.numel() for p in unet.parameters())
    assert f"trainable parameters: {mid:,} of {total:,}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Flags and processes


def test_an_unfreeze_selection_naming_a_missing_block_fails_clearly(tiny_sd_model, cached_dataset, tmp_path, capsys):
    code = main(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--targetted_training",
                      "--unfreeze_up_blocks", "7"))
    assert code == 2
    assert "--unfreeze_up_blocks 7: this UNet has up_blocks 0-1" in capsys.readouterr().err


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


def test_a_short_run_learns_to_use_its_text(tiny_sd_model, tmp_path):
    """On held-out pairs, at fixed noise and timesteps, the true caption beats another caption."""
    from cachetrain.models import load_training_scheduler

    probe = train_caption_probe(tiny_sd_model, tmp_path, lambda data, output: _args(
        tiny_sd_model, data, output, "--batch_size", "8", "--max_steps", "300", "--validation_split", "0.25"))
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


def test_own_optimizers_skip_on_the_device_when_found_inf_is_set():
    from cachetrain.optim import StochasticAdamW, StochasticLion

    for own_class in (StochasticAdamW, StochasticLion):
        for dtype in (torch.float32, torch.bfloat16):
            parameters = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in ((8, 8), (5,))]
            optimizer = own_class(parameters, lr=1e-2)
            for parameter in parameters:
                parameter.grad = torch.randn(parameter.shape).to(dtype)
            optimizer.step()  # a normal step first, so there is state to keep
            before = [parameter.detach().clone() for parameter in parameters]
            state_before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in parameters]
            parameters[0].grad = torch.full((8, 8), float("nan")).to(dtype)
            parameters[1].grad = torch.ones(5).to(dtype)  # finite, but the whole step is skipped
            optimizer.found_inf = torch.tensor(1.0)
            optimizer.step()
            for parameter, weights, states in zip(parameters, before, state_before):
                assert torch.equal(parameter.detach(), weights), (own_class, dtype)
                for name, value in optimizer.state[parameter].items():
                    assert torch.equal(value, states[name]), (own_class, dtype, name)


def test_a_text_scale_a_clip_pipeline_cannot_store_is_refused_before_loading(tiny_sd_model, cached_dataset,
                                                                            tmp_path, capsys):
    assert main(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--text_scaling_factor", "2")) == 2
    assert "no text projection to keep the scale" in capsys.readouterr().err


def test_a_vae_scale_override_is_saved_with_the_checkpoint(tiny_sd_model, cached_dataset, tmp_path):
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--vae_scaling_factor", "0.5")))
    config = json.loads((tmp_path / "run" / "checkpoint-00001" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.5


def test_offset_noise_adds_one_shared_value_per_channel():
    from cachetrain.objective import draw_sample_noise, sample_key

    key = sample_key(0, 0, 5)
    plain, _, _ = draw_sample_noise((4, 8, 8), 0.0, key)
    offset, _, _ = draw_sample_noise((4, 8, 8), 0.1, key)
    shift = offset - plain  # the same key draws the same base noise; the offset comes on top
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))  # constant over each channel
    assert 0 < shift.abs().max() < 1


def test_caption_dropout_trains_and_needs_each_roots_empty_prompt(tiny_sd_model, cached_dataset, tmp_path, capsys):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "2", "--caption_dropout", "0.5")))
    assert result.steps == 2
    (cached_dataset / ".empty_prompt.txt_clipl").unlink()
    assert main(_args(tiny_sd_model, cached_dataset, tmp_path / "run2", "--caption_dropout", "0.5")) == 2
    assert "--caption_dropout needs the empty prompt's embedding" in capsys.readouterr().err
