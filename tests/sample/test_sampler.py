"""sample_images.py and the samplers: every scheduler name draws, the sampler redraws exactly what the
trainer drew at a checkpoint, --watch follows a running training, and bad inputs are refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachetrain.models.sampling import SampleMetadata, read_sample_metadata, sample_filename
from tests.script_runs import run_script

REPO = Path(__file__).resolve().parents[2]
DDPM_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm")
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _flow_model(tiny_sd_model: Path, folder: Path) -> Path:
    """The tiny model with a flow-matching scheduler, as a flow-matching run saves it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shutil.copytree(tiny_sd_model, folder)
    shutil.rmtree(folder / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_sd_model):
    from cachetrain.models import loading as models

    return models.load_pipeline_around(str(tiny_sd_model), models.load_unet(str(tiny_sd_model)))


def _script(*args) -> subprocess.CompletedProcess:
    return run_script("sample_images.py", *args)


# ---------------------------------------------------------------------------------------------
# The samplers


@pytest.mark.parametrize("name", DDPM_SAMPLERS)
def test_each_ddpm_sampler_keeps_the_model_schedule_and_draws(tiny_pipeline, tiny_sd_model, name, tmp_path):
    from cachetrain.models.sampling import build_sampling_scheduler, draw_samples

    own = dict(tiny_pipeline.scheduler.config)
    scheduler = build_sampling_scheduler(name, own)
    expected_class = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                      "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                      "pndm": "PNDMScheduler"}[name]
    assert type(scheduler).__name__ == expected_class
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type",
                "timestep_spacing", "steps_offset"):
        assert scheduler.config[key] == own[key], key
    # the betas themselves: SD's scaled_linear schedule, written out here
    betas = torch.linspace(own["beta_start"] ** 0.5, own["beta_end"] ** 0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(scheduler.betas, betas)

    (path,) = draw_samples(tiny_pipeline, PROMPTS[:1], tmp_path, step=5, seed=11, sampler_steps=2,
                           guidance_scale=3.0, device=torch.device("cpu"), scheduler=scheduler, scheduler_name=name)
    assert path.name == sample_filename(0, PROMPTS[0])
    assert read_sample_metadata(path) == SampleMetadata(prompt=PROMPTS[0], negative_prompt="", seed=11, step=5,
                                                        sampler_steps=2, guidance_scale=3.0, scheduler=name)
    assert _pixels(path).shape == (64, 64, 3)  # the UNet's sample_size 16 times the tiny VAE's factor 4
    assert type(tiny_pipeline.scheduler).__name__ == "PNDMScheduler"  # the pipeline keeps its own (checkpoints save it)


def test_the_samplers_draw_different_images_and_the_model_own_is_recorded_by_class(tiny_pipeline, tmp_path):
    from cachetrain.models.sampling import build_sampling_scheduler, draw_samples

    images = {}
    for name in ("ddim", "euler_a", None):
        scheduler = build_sampling_scheduler(name, tiny_pipeline.scheduler.config) if name else None
        (path,) = draw_samples(tiny_pipeline, PROMPTS[:1], tmp_path / str(name), step=0, seed=11, sampler_steps=3,
                               guidance_scale=1.0, device=torch.device("cpu"), scheduler=scheduler, scheduler_name=name)
        images[name] = _pixels(path)
        if name is None:
            assert read_sample_metadata(path).scheduler == "PNDMScheduler"
    assert not np.array_equal(images["ddim"], images["euler_a"])
    assert not np.array_equal(images["ddim"], images[None])


def test_flow_euler_draws_a_flow_model_and_the_ddpm_samplers_are_refused_for_it(tiny_sd_model, tmp_path):
    from cachetrain.models import loading as models
    from cachetrain.models.sampling import SchedulerChoiceError, build_sampling_scheduler, draw_samples

    flow = _flow_model(tiny_sd_model, tmp_path / "flow")
    pipeline = models.load_pipeline_around(str(flow), models.load_unet(str(flow)))
    scheduler = build_sampling_scheduler("flow_euler", pipeline.scheduler.config)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 3.0
    (path,) = draw_samples(pipeline, PROMPTS[:1], tmp_path / "out", step=1, seed=2, sampler_steps=2,
                           guidance_scale=2.0, device=torch.device("cpu"), scheduler=scheduler,
                           scheduler_name="flow_euler")
    assert read_sample_metadata(path).scheduler == "flow_euler" and _pixels(path).shape == (64, 64, 3)
    for name in DDPM_SAMPLERS:
        with pytest.raises(SchedulerChoiceError, match=f"{name} is a DDPM sampler .* use flow_euler"):
            build_sampling_scheduler(name, pipeline.scheduler.config)
    with pytest.raises(SchedulerChoiceError, match="flow_euler samples flow-matching models and this one is a DDPM"):
        build_sampling_scheduler("flow_euler", models.load_pipeline_around(
            str(tiny_sd_model), models.load_unet(str(tiny_sd_model))).scheduler.config)


def test_zero_terminal_snr_is_kept_and_a_sampler_that_cannot_keep_it_is_refused(tiny_pipeline):
    from cachetrain.models.sampling import SchedulerChoiceError, build_sampling_scheduler

    config = {**tiny_pipeline.scheduler.config, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}
    for name in ("ddim", "euler", "euler_a", "dpmpp_2m"):
        scheduler = build_sampling_scheduler(name, config)
        assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
        assert scheduler.config.prediction_type == "v_prediction"
        # the last step is pure noise: alpha_bar of the last training timestep (near) zero
        assert float(scheduler.alphas_cumprod[-1]) < 1e-6, name
    with pytest.raises(SchedulerChoiceError, match="pndm cannot keep this model's zero-terminal-SNR betas"):
        build_sampling_scheduler("pndm", config)


# ---------------------------------------------------------------------------------------------
# The sampler redraws what the trainer drew


def _train_args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--gradient_clip", "0",
            "--batch_size", "4", *extra]


def _prompts_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text(f"# the prompts of this test\n\n{PROMPTS[1]}\n   \n  a green cross on a white background  \n",
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("model_kind, scheduler", [("sd", "euler_a"), ("t5", "dpmpp_2m")])
def test_the_sampler_redraws_the_trainer_samples_of_a_checkpoint_bit_for_bit(request, tmp_path, model_kind,
                                                                            scheduler):
    """Trained on 8x8 latents with --force_toklen 6: the sampler must find the training size in the
    checkpoint and the token length in the run's settings (SD1.5) or the T5 projection, and draw
    through the same code, for the pixels to match. euler_a draws fresh noise at every step."""
    from cachetrain.train.config import parse_train_args
    from cachetrain.sample.sampler_cli import main
    from cachetrain.tiny.models import write_random_pairs
    from cachetrain.train.trainer import train

    model = request.getfixturevalue("tiny_sd_model" if model_kind == "sd" else "tiny_t5_model")
    text_shape = (77, 32) if model_kind == "sd" else (9, 24)  # CLIP-L pads to 77; T5 stores real tokens
    write_random_pairs(tmp_path / "data", 16, latent_shape=(4, 8, 8), text_shape=text_shape)
    prompts_file = _prompts_file(tmp_path)
    run = tmp_path / "run"
    ema = ["--ema_decay", "0.9"] if model_kind == "sd" else []  # the trainer's samples show the EMA weights
    train(parse_train_args(_train_args(
        model, tmp_path / "data", run, "--max_steps", "2", "--save_steps", "1", "--force_toklen", "6",
        "--sample_prompt", PROMPTS[0], "--sample_prompts_file", str(prompts_file), "--sampler_steps", "2",
        "--sample_seed", "77", "--guidance_scale", "4.0", "--sample_scheduler", scheduler, *ema)))
    expected_prompts = [PROMPTS[0], PROMPTS[1], "a green cross on a white background"]
    checkpoint = run / "checkpoint-00002"  # the EMA equals the weights after one step, not after two
    trainer_pngs = sorted(checkpoint.glob("sample-*.png"))
    assert [p.name for p in trainer_pngs] == [sample_filename(i, p) for i, p in enumerate(expected_prompts)]
    assert json.loads((checkpoint / "unet" / "config.json").read_text())["sample_size"] == 8

    out = tmp_path / "resampled"
    assert main([str(checkpoint), "--prompt", PROMPTS[0], "--prompts_file", str(prompts_file), "--steps", "2",
                 "--seed", "77", "--guidance", "4.0", "--scheduler", scheduler, "--device", "cpu",
                 "--out", str(out)]) == 0
    for index, trained in enumerate(trainer_pngs):
        resampled = out / trained.name
        expected = SampleMetadata(prompt=expected_prompts[index], negative_prompt="", seed=77 + index, step=2,
                                  sampler_steps=2, guidance_scale=4.0, token_length=6, scheduler=scheduler)
        assert read_sample_metadata(trained) == read_sample_metadata(resampled) == expected
        assert _pixels(resampled).shape == (32, 32, 3)  # 8x8 latents, the tiny VAE's factor 4
        assert np.array_equal(_pixels(trained), _pixels(resampled)), trained.name

    # conditioned on another token length (as a sampler that ignored the training one would), it differs;
    # so does the raw UNet of an EMA run
    same = [str(checkpoint), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "77", "--guidance", "4.0",
            "--scheduler", scheduler]
    assert main([*same, "--force_toklen", "3", "--out", str(tmp_path / "other-length")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "other-length" / trainer_pngs[0].name), _pixels(trainer_pngs[0]))
    if ema:
        assert (checkpoint / "unet_ema").is_dir()
        assert main([*same, "--no_ema", "--out", str(tmp_path / "raw")]) == 0
        assert not np.array_equal(_pixels(tmp_path / "raw" / trainer_pngs[0].name), _pixels(trainer_pngs[0]))


# ---------------------------------------------------------------------------------------------
# --watch


@pytest.mark.slow
def test_watch_samples_every_checkpoint_of_a_running_training_and_ends_with_it(tiny_sd_model, tmp_path, capsys):
    """The watcher starts first; the trainer is paused at its first checkpoint until the watcher has
    sampled it (so the run is provably still writing checkpoints while it watches), then let go."""
    import signal

    from cachetrain.tiny.models import write_random_pairs

    write_random_pairs(tmp_path / "data", 16, latent_shape=(4, 8, 8), text_shape=(77, 32))
    prompts_file = _prompts_file(tmp_path)
    prompts = [PROMPTS[1], "a green cross on a white background"]
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    watcher = subprocess.Popen([sys.executable, "sample_images.py", "--watch", str(run), "--prompts_file",
                                str(prompts_file), "--steps", "2", "--seed", "5", "--device", "cpu", "--poll", "0.1"],
                               cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    trainer = None
    try:
        seen = []
        while not seen or "waiting for the next checkpoint" not in seen[-1]:
            seen.append(watcher.stderr.readline())
            assert seen[-1], "".join(seen)  # the watcher ended before it waited
        trainer = subprocess.Popen([sys.executable, "train_from_cached.py", *_train_args(
            tiny_sd_model, tmp_path / "data", run, "--max_steps", "6", "--save_steps", "2")],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = run / "checkpoint-00002"
        _wait_for(lambda: (first / "training_state.pt").exists() or trainer.poll() is not None, 120)
        os.kill(trainer.pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: (first / sample_filename(1, prompts[1])).exists(), 120)
            assert not (run / "train_summary.json").exists()  # sampled while the run still trains
        finally:
            os.kill(trainer.pid, signal.SIGCONT)
        trainer_stderr = trainer.communicate(timeout=300)[1]
        assert trainer.returncode == 0, trainer_stderr[-2000:]
        rest = watcher.communicate(timeout=300)[1]  # it ends by itself once the run has ended
    finally:
        for process in (watcher, trainer):
            if process is not None and process.poll() is None:
                process.kill()
    assert watcher.returncode == 0, rest[-2000:]
    assert "the run ended: 3 checkpoint(s) sampled, 0 already sampled, 0 pruned" in rest, rest[-2000:]

    for step in (2, 4, 6):
        folder = run / f"checkpoint-{step:05d}"
        assert sorted(p.name for p in folder.glob("sample-*.png")) == [
            sample_filename(i, p) for i, p in enumerate(prompts)], folder
        for index, prompt in enumerate(prompts):
            path = folder / sample_filename(index, prompt)
            assert read_sample_metadata(path) == SampleMetadata(
                prompt=prompt, negative_prompt="", seed=5 + index, step=step, sampler_steps=2, guidance_scale=7.5,
                scheduler="PNDMScheduler")
            assert _pixels(path).shape == (32, 32, 3)
    assert not list(run.glob(".checkpoint-*"))  # no staging folder left

    # a restart skips what is sampled (and stops at once: the run has ended)
    from cachetrain.sample.sampler_cli import main

    assert main(["--watch", str(run), "--prompts_file", str(prompts_file), "--steps", "2", "--seed", "5",
                 "--device", "cpu"]) == 0
    assert "0 checkpoint(s) sampled, 3 already sampled" in capsys.readouterr().err


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_reports_a_pruned_or_broken_checkpoint_and_samples_the_rest(tiny_sd_model, tmp_path, monkeypatch):
    from cachetrain.sample.folder_sampler import SampleSettings
    from cachetrain.sample.sampler_cli import watch

    run = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(tiny_sd_model, run / f"checkpoint-{step:05d}")
        (run / f"checkpoint-{step:05d}" / "training_state.pt").write_bytes(b"")
    broken = run / "checkpoint-00002" / "unet" / "diffusion_pytorch_model.safetensors"
    broken.write_bytes(b"not weights")
    (run / "checkpoint-00004.partial").mkdir()  # a save in progress: never sampled
    settings = SampleSettings(prompts=PROMPTS[:1], steps=2)

    result = watch(run, settings, once=True)
    assert (result.sampled, result.failed, result.pruned) == ([1, 3], [2], [])
    assert (run / "checkpoint-00003" / sample_filename(0, PROMPTS[0])).exists()
    assert not list((run / "checkpoint-00004.partial").iterdir())

    # a checkpoint deleted (by --keep_checkpoints) while it is sampled: reported as pruned, not brought back
    import cachetrain.sample.sampler_cli as sampler_cli

    real_sample_model = sampler_cli.sample_model

    def deleted_while_drawing(model, out_dir, settings, step=None):
        paths = real_sample_model(model, out_dir, settings, step)
        shutil.rmtree(model)
        return paths

    shutil.rmtree(run / "checkpoint-00002")
    shutil.copytree(tiny_sd_model, run / "checkpoint-00005")
    (run / "checkpoint-00005" / "training_state.pt").write_bytes(b"")
    monkeypatch.setattr(sampler_cli, "sample_model", deleted_while_drawing)
    result = watch(run, settings, once=True)
    assert (result.sampled, result.already_sampled, result.pruned) == ([], [1, 3], [5])
    assert not (run / "checkpoint-00005").exists()
    assert not list(run.glob(".checkpoint-*"))


# ---------------------------------------------------------------------------------------------
# Prompts files and bad inputs


def test_a_prompts_file_gives_its_lines_in_order_without_blanks_and_comments(tmp_path):
    from cachetrain.models.prompts import PromptsFileError, read_prompts_file

    assert [p.prompt for p in read_prompts_file(_prompts_file(tmp_path))] == [PROMPTS[1], "a green cross on a white background"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(PromptsFileError, match="empty.txt: holds no prompt"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(PromptsFileError, match="missing.txt: no such file"):
        read_prompts_file(tmp_path / "missing.txt")


def test_the_trainer_refuses_a_missing_prompts_file_and_a_flow_sampler_for_a_ddpm_model(tiny_sd_model, tmp_path,
                                                                                        capsys):
    from cachetrain.train.config import ConfigError, parse_train_args
    from cachetrain.train.trainer import main

    with pytest.raises(ConfigError, match="--sample_prompts_file .*missing.txt: no such file"):
        parse_train_args(_train_args(tiny_sd_model, tmp_path, tmp_path / "run", "--sample_prompts_file",
                                     str(tmp_path / "missing.txt")))
    from cachetrain.tiny.models import write_random_pairs

    write_random_pairs(tmp_path / "data", 8)
    assert main(_train_args(tiny_sd_model, tmp_path / "data", tmp_path / "run2", "--max_steps", "1",
                            "--sample_prompt", "x", "--sample_scheduler", "flow_euler")) == 2
    assert ("error: --sample_scheduler flow_euler samples flow-matching models and this one is a DDPM model"
            in capsys.readouterr().err)
    assert not (tmp_path / "run2" / "checkpoint-00001").exists()


@pytest.mark.parametrize("case", ["no such folder", "not a pipeline", "a run folder", "empty prompts file",
                                  "flow sampler for a DDPM model", "--watch a file", "--watch a model",
                                  "--watch a checkpoint", "--watch a data folder"])
def test_bad_inputs_are_refused_in_one_line_with_status_2(tiny_sd_model, tmp_path, case):
    prompt = ["--prompt", "a red circle"]
    if case == "no such folder":
        args, expected = [tmp_path / "nowhere", *prompt], f"{tmp_path / 'nowhere'}: no such folder"
    elif case == "--watch a file":
        (tmp_path / "train.log").write_text("not a run")
        args, expected = ["--watch", tmp_path / "train.log", *prompt], \
            f"--watch {tmp_path / 'train.log'}: a file, not a folder"
    elif case in ("--watch a model", "--watch a checkpoint"):  # it would be watched for checkpoints forever
        shutil.copytree(tiny_sd_model, tmp_path / "checkpoint-00002")
        if case == "--watch a checkpoint":
            (tmp_path / "checkpoint-00002" / "training_state.pt").write_bytes(b"")
        args, expected = ["--watch", tmp_path / "checkpoint-00002", *prompt], \
            "a model folder, not a training run's (sample it as MODEL, without --watch)"
    elif case == "--watch a data folder":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "a.img_sdvae").write_bytes(b"")
        args, expected = ["--watch", tmp_path / "data", *prompt], \
            "not a training run's folder (no train_args.json, no checkpoint-*)"
    elif case == "not a pipeline":
        (tmp_path / "stuff").mkdir()
        (tmp_path / "stuff" / "notes.txt").write_text("hello")
        args, expected = [tmp_path / "stuff", *prompt], "not a pipeline folder (no model_index.json)"
    elif case == "a run folder":
        shutil.copytree(tiny_sd_model, tmp_path / "run" / "checkpoint-00001")
        (tmp_path / "run" / "checkpoint-00001" / "training_state.pt").write_bytes(b"")
        args, expected = [tmp_path / "run", *prompt], "a training run's folder: sample its checkpoints with --watch"
    elif case == "empty prompts file":
        (tmp_path / "p.txt").write_text("\n# only a comment\n")
        args, expected = [tiny_sd_model, "--prompts_file", tmp_path / "p.txt"], "p.txt: holds no prompt"
    else:
        args, expected = [tiny_sd_model, *prompt, "--scheduler", "flow_euler", "--steps", "1"], \
            "--scheduler flow_euler samples flow-matching models and this one is a DDPM model (PNDMScheduler)"
    result = _script(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.mark.parametrize("case", ["an existing file", "inside a file", "an existing file, with --watch"])
def test_an_out_that_cannot_hold_the_pngs_is_refused_in_one_line_before_the_model_loads(tiny_sd_model, tmp_path,
                                                                                          monkeypatch, case):
    from cachetrain.sample import folder_sampler

    monkeypatch.setattr(folder_sampler, "load_sampling_pipeline",
                        lambda *a: pytest.fail("the model was loaded before --out was checked"))
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "samples" if case == "inside a file" else tmp_path / "a-file"
    model = ["--watch", tmp_path / "run", "--once"] if "--watch" in case else [tiny_sd_model]
    if "--watch" in case:
        shutil.copytree(tiny_sd_model, tmp_path / "run" / "checkpoint-00001")
        (tmp_path / "run" / "checkpoint-00001" / "training_state.pt").write_bytes(b"")
    result = _script(*model, "--prompt", "a red circle", "--steps", "1", "--device", "cpu", "--out", out)
    assert result.returncode == 2, result.stderr
    expected = (f"--out {out}: {tmp_path / 'a-file'} is a file, not a folder" if case == "inside a file"
                else f"--out {out}: an existing file, not a folder")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_pipeline_folder_whose_weights_are_damaged_fails_in_one_line_with_status_1(tiny_sd_model, tmp_path):
    shutil.copytree(tiny_sd_model, tmp_path / "model")
    (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    result = _script(tmp_path / "model", "--prompt", "a red circle", "--steps", "1", "--out", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'model'}: cannot be sampled ("), result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_num_images_inc_seed_and_size_flags_shape_what_is_drawn(tiny_sd_model, tmp_path):
    from cachetrain.sample.sampler_cli import main

    common = [str(tiny_sd_model), "--prompt", PROMPTS[0], "--num_images", "2", "--steps", "1", "--seed", "9",
              "--width", "32", "--height", "48", "--guidance", "1.0"]
    assert main([*common, "--no-inc_seed", "--out", str(tmp_path / "same")]) == 0
    assert main([*common, "--out", str(tmp_path / "inc")]) == 0
    names = [sample_filename(0, PROMPTS[0]), sample_filename(1, PROMPTS[0])]
    same = [tmp_path / "same" / name for name in names]
    inc = [tmp_path / "inc" / name for name in names]
    assert [read_sample_metadata(p).seed for p in same] == [9, 9]
    assert [read_sample_metadata(p).seed for p in inc] == [9, 10]
    assert _pixels(same[0]).shape == (48, 32, 3)
    assert np.array_equal(_pixels(same[0]), _pixels(same[1]))  # one seed, one prompt: one image
    assert np.array_equal(_pixels(same[0]), _pixels(inc[0]))
    assert not np.array_equal(_pixels(inc[0]), _pixels(inc[1]))


def test_ctrl_c_stops_a_waiting_watcher_in_one_line_with_status_130(tmp_path):
    import signal

    (tmp_path / "run").mkdir()
    # a suite started in the background (`... &`) hands its children Ctrl-C ignored, and Python then keeps
    # it ignored; the terminal a user presses Ctrl-C in starts the watcher with the default
    watcher = subprocess.Popen([sys.executable, "sample_images.py", "--watch", str(tmp_path / "run"), "--prompt", "x",
                                "--device", "cpu", "--poll", "0.1"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "waiting for the next checkpoint" in watcher.stderr.readline()
        watcher.send_signal(signal.SIGINT)
        rest = watcher.communicate(timeout=60)[1]
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 130
    assert rest.strip().splitlines() == [
        "[sample] stopped (Ctrl-C); a restart with --watch skips the checkpoints already sampled"]
