"""Presets: one source for the recipes train_sd.sh and train_t5.sh run. config.py's defaults < the preset <
the flags given; the wrappers select their preset and pass only the settings their user filled in."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachetrain.train.config import parse_train_args
from cachetrain.train.presets import PRESETS

from tests.conftest import REPO_ROOT
from tests.script_runs import run_script

REQUIRED = ["--pretrained_model", "m", "--train_data_dir", "d"]
WRAPPERS = {"train_sd.sh": "sd15", "train_t5.sh": "t5"}
# wrapper setting -> the TrainConfig field it sets
SETTING_FIELDS = {"IMG_SUFFIX": "imgcache_suffix", "TXT_SUFFIX": "txtcache_suffix", "LEARNING_RATE": "learning_rate",
                  "BATCH_SIZE": "batch_size", "GRADIENT_ACCUM": "gradient_accum", "MAX_STEPS": "max_steps",
                  "SAVE_STEPS": "save_steps", "SCHEDULER": "scheduler", "WARMUP_STEPS": "warmup_steps",
                  "SNR_GAMMA": "noise_gamma", "OPTIMIZER": "optimizer", "SAMPLER_STEPS": "sampler_steps",
                  "GRADIENT_CHECKPOINTING": "gradient_checkpointing"}


def test_a_preset_replaces_the_defaults_and_a_flag_given_wins_over_it():
    plain = parse_train_args(REQUIRED)
    assert (plain.preset, plain.batch_size, plain.scheduler, plain.use_snr) == (None, 4, "constant", False)
    sd15 = parse_train_args(["--preset", "sd15", *REQUIRED])
    assert (sd15.preset, sd15.batch_size, sd15.gradient_accum, sd15.scheduler, sd15.warmup_steps) == \
        ("sd15", 16, 4, "cosine", "100")
    assert (sd15.use_snr, sd15.noise_gamma, sd15.imgcache_suffix, sd15.txtcache_suffix) == \
        (True, 5.0, ".img_sdvae", ".txt_clipl")
    assert sd15.ema_decay == plain.ema_decay  # what the preset leaves alone stays config.py's default
    overridden = parse_train_args([*REQUIRED, "--batch_size", "2", "--preset", "sd15", "--no-use_snr",
                                   "--scheduler", "linear"])
    assert (overridden.batch_size, overridden.use_snr, overridden.scheduler, overridden.gradient_accum) == \
        (2, False, "linear", 4)
    t5 = parse_train_args(["--preset", "t5", *REQUIRED])
    assert (t5.batch_size, t5.gradient_accum, t5.gradient_checkpointing, t5.imgcache_suffix, t5.txtcache_suffix) == \
        (64, 1, True, ".img_sdxl", ".txt_t5cache")
    assert not parse_train_args(["--preset", "t5", *REQUIRED, "--no-gradient_checkpointing"]).gradient_checkpointing


def _help(*flags: str, capsys) -> str:
    from cachetrain.commands import train_from_cached

    with pytest.raises(SystemExit) as done:
        train_from_cached([*flags, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_preset_help_shows_the_presets_values_as_the_defaults(capsys):
    text = _help("--preset", "t5", capsys=capsys)
    assert "--batch_size BATCH_SIZE samples per micro-batch (per process) (default: 64)" in text
    assert "--txtcache_suffix TXTCACHE_SUFFIX suffix of the text-embedding sidecars (default: .txt_t5cache)" in text
    assert "--preset t5 sets: --imgcache_suffix .img_sdxl --txtcache_suffix .txt_t5cache" in text
    assert "samples per micro-batch (per process) (default: 4)" in _help(capsys=capsys)


def test_an_unknown_preset_is_one_line_and_exit_2():
    done = run_script("train_from_cached.py", "--preset", "sdxl", *REQUIRED)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["train_from_cached.py: error: argument --preset: invalid choice: 'sdxl' "
                                        "(choose from 'sd15', 't5') (see train_from_cached.py --help)"]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_each_wrapper_comment_shows_the_value_its_preset_gives(wrapper):
    """`VAR="${VAR:-}"  # preset: VALUE`: what a user reads in the wrapper is what the run gets."""
    config = parse_train_args(["--preset", WRAPPERS[wrapper], *REQUIRED])
    shown = dict(re.findall(r'^(\w+)="\$\{\1:-\}"\s+# preset: (\S+)', (REPO_ROOT / wrapper).read_text(), re.M))
    assert set(shown) == set(SETTING_FIELDS)
    for setting, text in shown.items():
        value = getattr(config, SETTING_FIELDS[setting])
        if isinstance(value, bool):  # GRADIENT_CHECKPOINTING: 1 or 0
            assert text == str(int(value)), (setting, text)
        else:
            assert type(value)(text) == value, (setting, text)
    assert config.use_snr  # SNR_GAMMA's comment names a weighting that is on


def _fake_launch_home(tmp_path: Path, wrapper: str) -> tuple[Path, Path, Path]:
    """A CACHETRAIN_HOME whose .venv/bin/python writes the arguments it was given to a file, one a line;
    and a copy of the wrapper kept elsewhere, as a user keeps their settings."""
    home, received = tmp_path / "home", tmp_path / "argv.txt"
    (home / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "launch_training.sh", home / "scripts")
    fake = home / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && exit 0\n'
                    f'[ "$2" = cachetrain.train.run_name ] && PYTHONPATH={REPO_ROOT} exec {sys.executable} "$@"\n'  # the real naming
                    f'echo "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF" > {received}.env\n'
                    f'printf "%s\\n" "$@" > {received}\n')
    fake.chmod(0o755)
    settings = tmp_path / "mine" / wrapper
    settings.parent.mkdir()
    shutil.copy(REPO_ROOT / wrapper, settings)
    return home, settings, received


def _launch(settings: Path, home: Path, received: Path, hf_home: Path, **env: str) -> list[str]:
    done = subprocess.run([str(settings)], cwd=settings.parent, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(hf_home), "HF_HOME": str(hf_home),
                               "CACHETRAIN_HOME": str(home), **env})
    assert done.returncode == 0, done.stderr
    return received.read_text().splitlines()


def test_the_wrappers_pass_their_preset_and_only_the_settings_a_user_filled_in(tmp_path):
    home, settings, received = _fake_launch_home(tmp_path, "train_t5.sh")
    argv = _launch(settings, home, received, tmp_path / "hf")
    trainer = str(home / "train_from_cached.py")
    assert argv == [trainer, "--preset", "t5", "--copy_config", str(settings),
                    "--pretrained_model", "models/sd15-sdxlvae-t5",
                    "--train_data_dir", "/data/images", "--sample_prompt", "a photo of a cat sitting on a windowsill",
                    "a watercolor landscape with mountains and a lake", "--output_dir", "t5_b64a1_1e-05_cosine10000g5"]
    # an override from the environment is passed, the booleans both ways; accelerate launch with a config
    accelerate_config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    accelerate_config.parent.mkdir(parents=True)
    accelerate_config.write_text("compute_environment: LOCAL_MACHINE\n")
    argv = _launch(settings, home, received, tmp_path / "hf", BATCH_SIZE="8", SNR_GAMMA="off",
                   GRADIENT_CHECKPOINTING="0", DATA_DIRS="/a /b", EXTRA_ARGS="--seed 3")
    assert argv[:3] == ["-m", "accelerate.commands.launch", trainer]
    assert argv[3:] == ["--preset", "t5", "--copy_config", str(settings), "--pretrained_model",
                        "models/sd15-sdxlvae-t5", "--batch_size", "8",
                        "--no-use_snr", "--no-gradient_checkpointing", "--train_data_dir", "/a", "--train_data_dir",
                        "/b", "--sample_prompt", "a photo of a cat sitting on a windowsill",
                        "a watercolor landscape with mountains and a lake", "--seed", "3",
                        "--output_dir", "t5_b8a1_1e-05_cosine10000"]  # named from the settings: no gamma
    argv = _launch(settings, home, received, tmp_path / "elsewhere", SNR_GAMMA="3.5", GRADIENT_CHECKPOINTING="1")
    assert argv[0] == trainer and "--use_snr --noise_gamma 3.5 --gradient_checkpointing" in " ".join(argv)
    # folders whose paths hold spaces (or a glob character): "|" between them, each passed whole
    argv = _launch(settings, home, received, tmp_path / "hf", DATA_DIRS="/data/my photos|/data/b*")
    assert argv[argv.index("--train_data_dir"):][:4] == ["--train_data_dir", "/data/my photos",
                                                        "--train_data_dir", "/data/b*"]


def test_wrapper_checkpoint_argument_touches_the_trigger_of_the_runs_named_output_folder(tmp_path):
    # the original's habits: OUTPUT_DIR left empty names the folder from the settings, "./train_sd.sh
    # checkpoint" asks the running training of those settings for a checkpoint, the allocator is set
    home, settings, received = _fake_launch_home(tmp_path, "train_sd.sh")
    argv = _launch(settings, home, received, tmp_path / "hf", LEARNING_RATE="3e-5", BATCH_SIZE="64")
    assert argv[-2:] == ["--output_dir", "sd15_b64a4_3e-05_cosine10000g5"]
    assert (tmp_path / "argv.txt.env").read_text().strip() == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    run_folder = settings.parent / "sd15_b64a4_3e-05_cosine10000g5"
    run_folder.mkdir()
    received.unlink()
    done = subprocess.run([str(settings), "checkpoint"], cwd=settings.parent, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path),
                                           "CACHETRAIN_HOME": str(home), "LEARNING_RATE": "3e-5",
                                           "BATCH_SIZE": "64"})
    assert done.returncode == 0, done.stderr
    assert (run_folder / "trigger.checkpoint").exists() and not received.exists()  # no training started
    other = subprocess.run([str(settings), "nonsense"], cwd=settings.parent, capture_output=True, text=True,
                           timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                            "CACHETRAIN_HOME": str(home)})
    assert other.returncode == 2 and "unknown argument 'nonsense'; known: checkpoint" in other.stderr
    # settings whose run has not started: one line, status 2, nothing queued
    missing = subprocess.run([str(settings), "checkpoint"], cwd=settings.parent, capture_output=True, text=True,
                             timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                              "CACHETRAIN_HOME": str(home), "OUTPUT_DIR": str(tmp_path / "not-yet")})
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [f"{settings} checkpoint: no training folder {tmp_path / 'not-yet'} "
                                                   "(is a run of these settings started?)"]


def test_a_settings_file_from_before_presets_runs_as_it_always_did(tmp_path):
    """A copy of train_sd.sh kept from before presets: no PRESET, every value filled in, min-SNR turned
    off the way its comment said (an empty SNR_GAMMA). It passes what it sets and no preset."""
    home, settings, received = _fake_launch_home(tmp_path, "train_sd.sh")
    settings.write_text("""#!/usr/bin/env bash
set -euo pipefail
MODEL="${MODEL:-models/mine}"
DATA_DIRS="${DATA_DIRS:-/data/images}"
OUTPUT_DIR="${OUTPUT_DIR:-output/sd15}"
IMG_SUFFIX="${IMG_SUFFIX:-.img_sdvae}"
TXT_SUFFIX="${TXT_SUFFIX:-.txt_clipl}"
LEARNING_RATE="${LEARNING_RATE:-1e-5}"
BATCH_SIZE="${BATCH_SIZE:-16}"
GRADIENT_ACCUM="${GRADIENT_ACCUM:-4}"
MAX_STEPS="${MAX_STEPS:-10000}"
SAVE_STEPS="${SAVE_STEPS:-1000}"
SCHEDULER="${SCHEDULER:-cosine}"
WARMUP_STEPS="${WARMUP_STEPS:-100}"
SNR_GAMMA=""                                            # empty disables min-SNR weighting
OPTIMIZER="${OPTIMIZER:-adamw}"
SAMPLER_STEPS="${SAMPLER_STEPS:-30}"
PROMPTS=("a photo of a cat")
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
source "${CACHETRAIN_HOME:-$(dirname "$0")}/scripts/launch_training.sh"
""")
    argv = _launch(settings, home, received, tmp_path / "hf")
    assert "--preset" not in argv and "--use_snr" not in argv
    assert argv == [str(home / "train_from_cached.py"), "--copy_config", str(settings),
                    "--pretrained_model", "models/mine",
                    "--imgcache_suffix", ".img_sdvae", "--txtcache_suffix", ".txt_clipl", "--learning_rate", "1e-5",
                    "--batch_size", "16", "--gradient_accum", "4", "--max_steps", "10000", "--save_steps", "1000",
                    "--scheduler", "cosine", "--warmup_steps", "100", "--optimizer", "adamw", "--sampler_steps", "30",
                    "--no-gradient_checkpointing", "--train_data_dir", "/data/images", "--sample_prompt",
                    "a photo of a cat", "--output_dir", "output/sd15"]
    assert not parse_train_args(argv[1:]).use_snr  # config.py's default: off, as the old comment promised


@pytest.mark.slow
def test_train_sd_runs_its_preset_with_the_users_override_and_keeps_its_settings(tiny_sd_model, cached_dataset,
                                                                                tmp_path):
    """The real wrapper, copied elsewhere (CACHETRAIN_HOME), on the tiny model: train_args.json holds the
    preset's recipe and the user's environment overrides, and the settings file is archived."""
    settings = tmp_path / "mine" / "train_sd.sh"
    settings.parent.mkdir()
    shutil.copy(REPO_ROOT / "train_sd.sh", settings)
    output = tmp_path / "run"
    env = {**os.environ, "CACHETRAIN_HOME": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "MODEL": str(tiny_sd_model), "DATA_DIRS": str(cached_dataset), "OUTPUT_DIR": str(output),
           "BATCH_SIZE": "2", "MAX_STEPS": "1", "PROMPTS_OVERRIDE": "a red circle",
           "EXTRA_ARGS": "--num_workers 0 --no_progress"}
    done = subprocess.run([str(settings)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (start,) = json.loads((output / "train_args.json").read_text())
    config = start["config"]
    recipe = {name: value for name, value in PRESETS["sd15"].items() if name not in ("batch_size", "max_steps")}
    assert {name: config[name] for name in recipe} == recipe
    assert (config["preset"], config["batch_size"], config["max_steps"], config["gradient_accum"]) == \
        ("sd15", 2, "1", 4)
    assert "--gradient_accum" not in start["argv"] and "--scheduler" not in start["argv"]
    assert (output / "train_sd.sh").read_bytes() == settings.read_bytes()
    assert json.loads((output / "train_summary.json").read_text())["steps"] == 1


def test_a_resumed_preset_run_gets_the_same_config(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.train.trainer import train

    output = tmp_path / "run"
    flags = ["--preset", "sd15", "--pretrained_model", str(tiny_sd_model), "--train_data_dir", str(cached_dataset),
             "--output_dir", str(output), "--batch_size", "2", "--max_steps", "2", "--num_workers", "0",
             "--no_progress"]
    stopped = train(parse_train_args(flags), interrupt_after_batches=4)  # one optimizer step (4 x 2)
    assert stopped.interrupted and stopped.steps == 1
    resumed = train(parse_train_args([*flags, "--resume"]))
    assert resumed.steps == 2 and resumed.final_saved
    first, second = (start["config"] for start in json.loads((output / "train_args.json").read_text()))
    assert second.pop("resume") == "latest" and first.pop("resume") is None
    assert first == second and first["preset"] == "sd15" and first["gradient_accum"] == 4
