"""Hub-style custom pipeline folders (root pipeline.py, component code beside its weights) through the
real scripts: cached, trained, and every checkpoint and the final model loaded by plain diffusers as the
source was; folders whose code cannot be loaded, or is not trusted, refused at the start, naming the file.

The folders are written by tests/hubstyle_support.py from the tiny T5 model. The scripts run as
subprocesses (as a user runs them), several at once where they do not depend on each other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachetrain import sidecar
from tests.conftest import REPO_ROOT
from tests.hubstyle_support import (PIPELINE_CLASS, PROJECTION_CLASS, VARIANTS, write_hubstyle_folder,
                                    write_t5_encoder_folder)
from tests.script_runs import run_script

PROMPT = "a red circle on a blue background"


def _environment(modules_cache: Path) -> dict[str, str]:
    # each run's own modules cache: diffusers copies a folder's code there before importing it
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(modules_cache)}


def run_all(commands: dict[str, list[str]], scratch: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the scripts at once (2 cores: their imports overlap), each from the repository root; their results by name."""
    started = {}
    for name, command in commands.items():
        started[name] = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=_environment(scratch / "modules" / name))
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def _succeeded(results: dict[str, subprocess.CompletedProcess]) -> None:
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"


def cache_flags(root: Path) -> list[str]:
    return ["--data_root", str(root), "--num_workers", "0", "--no_progress", "--save_dtype", "float32"]


def train_flags(model: Path, data: Path, output: Path) -> list[str]:
    return ["train_from_cached.py", "--pretrained_model", str(model), "--train_data_dir", str(data),
            "--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX, "--txtcache_suffix", sidecar.T5_SUFFIX,
            "--output_dir", str(output), "--batch_size", "2", "--max_steps", "2", "--save_steps", "2",
            "--learning_rate", "1e-3", "--num_workers", "0", "--no_progress",
            "--sample_prompt", PROMPT, "--sampler_steps", "2"]


@pytest.fixture(scope="module")
def hubstyle_folders(tiny_t5_model, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hubstyle")
    encoder = write_t5_encoder_folder(tiny_t5_model, base / "t5-encoder-only")
    return {variant: write_hubstyle_folder(tiny_t5_model, base / variant, variant, encoder) for variant in VARIANTS}


@pytest.fixture(scope="module")
def hubstyle_runs(hubstyle_folders, tmp_path_factory):
    """Each variant cached (no trust flag for the T5 cache; bare --custom for the latents), trained 2 steps
    with --custom or its alias --is_custom, then every source, checkpoint and final model loaded and drawn by
    plain diffusers. (folders, data roots, run folders, script results, plain-diffusers results by folder)"""
    from cachetrain.tiny.models import make_shapes_dataset

    scratch = tmp_path_factory.mktemp("hubstyle-runs")
    data = {variant: scratch / "data" / variant for variant in VARIANTS}
    for root in data.values():
        make_shapes_dataset(root, count=4, seed=1, folders=1)
    # the latents in this process (create_img_sdxl.py's main; it runs no folder code): one import less
    from cachetrain.cache.image_cache import main as image_main
    from create_img_sdxl import DEFAULTS

    some_folder = str(hubstyle_folders["module-projection"])  # the same VAE in all three
    # the seed's own spelling: a bare --custom means --model is the custom pipeline folder
    assert image_main(["--model", some_folder, "--custom", "--resolution", "64",
                       *cache_flags(data["module-projection"]), "--data_root", str(data["root-projection"]),
                       str(data["our-projection"])], DEFAULTS) == 0
    texts = run_all({f"cache {variant}": ["create_t5cache_768.py", "--model", str(hubstyle_folders[variant]),
                                          *cache_flags(data[variant])] for variant in VARIANTS}, scratch)
    _succeeded(texts)
    runs = {variant: scratch / "runs" / variant for variant in VARIANTS}
    trust = {"module-projection": "--is_custom", "root-projection": "--custom", "our-projection": "--is_custom"}
    trained = run_all({f"train {variant}": [*train_flags(hubstyle_folders[variant], data[variant], runs[variant]),
                                 trust[variant]] for variant in VARIANTS}, scratch)
    _succeeded(trained)
    loaded = [*hubstyle_folders.values(), *[runs[v] / "checkpoint-00002" for v in VARIANTS], *runs.values()]
    drawn = run_all({"draw": ["-m", "tests.hubstyle_support", "draw", *map(str, loaded)]}, scratch)["draw"]
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    plain = {Path(entry["folder"]): entry for entry in map(json.loads, drawn.stdout.splitlines())}
    return {"folders": hubstyle_folders, "data": data, "runs": runs, "scripts": {**texts, **trained},
            "plain": plain}


@pytest.mark.slow
def test_plain_diffusers_loads_and_draws_each_hubstyle_variant_as_built(hubstyle_runs):
    # the folders are what the original's users have: plain diffusers, none of our code imported for them
    for variant, folder in hubstyle_runs["folders"].items():
        loaded = hubstyle_runs["plain"][folder]
        assert (loaded["class"], loaded["module"]) == (PIPELINE_CLASS, "diffusers_modules.local.pipeline"), variant
        assert loaded["size"] == [64, 64] and loaded["pixel_std"] > 0, variant
        assert loaded["cachetrain_imported"] == (variant == "our-projection"), variant  # its pipeline.py imports ours


@pytest.mark.slow
def test_the_t5_cache_takes_each_hubstyle_folder_with_no_flag_and_the_latents_take_its_vae(hubstyle_runs):
    for variant, root in hubstyle_runs["data"].items():
        images = sorted(root.rglob("*.jpg"))
        assert len(images) == 4
        for image in images:
            assert sidecar.read_sidecar(image.with_suffix(sidecar.SDXL_VAE_SUFFIX), "latent").shape == (4, 16, 16)
            embedding = sidecar.read_sidecar(image.with_suffix(sidecar.T5_SUFFIX), "emb")
            assert embedding.shape[1] == 24 and embedding.abs().sum() > 0, variant
        assert "written 4" in hubstyle_runs["scripts"][f"cache {variant}"].stderr, variant


@pytest.mark.slow
def test_each_variant_caches_the_same_embeddings_as_the_weights_are_the_same(hubstyle_runs):
    # one T5 and one projection in three layouts (the last one's T5 found through its pipeline.py):
    # any layout read wrongly (another encoder, a fresh projection) would give other numbers
    import torch

    data = hubstyle_runs["data"]
    for caption in sorted(data["module-projection"].rglob("*.txt")):
        relative = caption.relative_to(data["module-projection"]).with_suffix(sidecar.T5_SUFFIX)
        reference = sidecar.read_sidecar(data["module-projection"] / relative, "emb")
        for variant in ("root-projection", "our-projection"):
            torch.testing.assert_close(sidecar.read_sidecar(data[variant] / relative, "emb"), reference)


@pytest.mark.slow
def test_the_projection_the_cache_ran_is_the_folders_own_class(hubstyle_runs):
    from safetensors import safe_open

    expected = {"module-projection": PROJECTION_CLASS, "root-projection": PROJECTION_CLASS,
                "our-projection": "T5Projection"}
    for variant, root in hubstyle_runs["data"].items():
        with safe_open(str(next(root.rglob("*" + sidecar.T5_SUFFIX))), "pt") as handle:
            assert handle.metadata()["projection_class"] == expected[variant], variant


@pytest.mark.slow
def test_every_checkpoint_and_the_final_model_load_as_their_hubstyle_source_did(hubstyle_runs):
    for variant, run in hubstyle_runs["runs"].items():
        source = hubstyle_runs["folders"][variant]
        source_index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
        assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-00002"], variant
        for saved in (run / "checkpoint-00002", run):
            index = json.loads((saved / "model_index.json").read_text(encoding="utf-8"))
            assert index["_class_name"] == source_index["_class_name"], (variant, saved)
            assert index["t5_projection"] == source_index["t5_projection"], (variant, saved)
            assert (saved / "pipeline.py").read_text() == (source / "pipeline.py").read_text()
            loaded = hubstyle_runs["plain"][saved]
            assert (loaded["class"], loaded["size"]) == (PIPELINE_CLASS, [64, 64]), (variant, saved)
            assert loaded["pixel_std"] > 0
            assert loaded["projection"] == (PROJECTION_CLASS if variant != "our-projection" else "T5Projection")
        assert len(list((run / "checkpoint-00002").glob("sample-*.png"))) == 1, variant  # drawn by its class
        script = hubstyle_runs["scripts"][f"train {variant}"]
        assert "final model in" in script.stderr + script.stdout, variant
    module_copy = hubstyle_runs["runs"]["module-projection"] / "checkpoint-00002" / "t5_projection" / "hub_projection.py"
    assert module_copy.is_file()  # the projection's code back beside its weights
    assert (hubstyle_runs["runs"]["root-projection"] / "t5_projection" / "pipeline.py").is_file()


@pytest.mark.slow
def test_the_trained_unet_is_what_each_checkpoint_holds(hubstyle_runs):
    import torch
    from diffusers import UNet2DConditionModel

    for variant, run in hubstyle_runs["runs"].items():
        trained = UNet2DConditionModel.from_pretrained(run / "checkpoint-00002", subfolder="unet").state_dict()
        source = UNet2DConditionModel.from_pretrained(hubstyle_runs["folders"][variant], subfolder="unet").state_dict()
        assert any(not torch.equal(trained[key], source[key]) for key in trained), variant  # 2 steps moved it


# --- refused at the start, naming the file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def refusals(hubstyle_folders, tmp_path_factory):
    """Broken or untrusted folders given to the scripts (all at once); the results by case."""
    from cachetrain.tiny.models import make_shapes_dataset

    scratch = tmp_path_factory.mktemp("hubstyle-refusals")
    root = scratch / "data"
    make_shapes_dataset(root, count=2, seed=1, folders=1)

    def broken(name: str, variant: str) -> Path:
        folder = scratch / name
        shutil.copytree(hubstyle_folders[variant], folder)
        return folder

    no_pipeline_code = broken("no-pipeline-py", "module-projection")
    (no_pipeline_code / "pipeline.py").unlink()
    no_projection_class = broken("no-projection-class", "module-projection")
    (no_projection_class / "t5_projection" / "hub_projection.py").write_text("import torch\n", encoding="utf-8")
    syntax_error = broken("syntax-error", "root-projection")
    (syntax_error / "pipeline.py").write_text("import torch\nclass HubT5Pipeline(:\n    pass\n", encoding="utf-8")
    # folder code the scripts import (diffusers copies it into a modules cache): each in a process of its own
    loading = {
        "cache: no projection class": (no_projection_class, ["create_t5cache_768.py", "--model",
                                                             str(no_projection_class), *cache_flags(root)]),
        "train: syntax error": (syntax_error, [*train_flags(syntax_error, root, scratch / "run-a"), "--is_custom"]),
    }
    # refused before any folder code is imported: in this process, as tests/script_runs.py runs scripts
    not_loading = {
        "cache: no pipeline.py": (no_pipeline_code, ["create_t5cache_768.py", "--model", str(no_pipeline_code),
                                                     *cache_flags(root)]),
        "train: not trusted": (hubstyle_folders["module-projection"],
                               train_flags(hubstyle_folders["module-projection"], root, scratch / "run-b")),
    }
    results = run_all({name: command for name, (_, command) in loading.items()}, scratch)
    results.update({name: run_script(*command) for name, (_, command) in not_loading.items()})
    return {name: (folder, results[name], scratch) for name, (folder, _) in {**loading, **not_loading}.items()}


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_folder_whose_class_name_needs_a_missing_pipeline_py_is_refused_naming_it(refusals):
    folder, result, _ = refusals["cache: no pipeline.py"]
    line = _one_line_error(result)
    assert f"{folder / 'pipeline.py'}: no such file" in line and PIPELINE_CLASS in line, line
    assert not list((refusals["cache: no pipeline.py"][2] / "data").rglob("*" + sidecar.T5_SUFFIX))


@pytest.mark.slow
def test_a_projection_module_that_does_not_define_its_class_is_refused_naming_it(refusals):
    folder, result, _ = refusals["cache: no projection class"]
    line = _one_line_error(result)
    assert f"{folder / 't5_projection' / 'hub_projection.py'} defines no class {PROJECTION_CLASS}" in line, line


@pytest.mark.slow
def test_a_syntax_error_in_pipeline_py_is_refused_by_the_trainer_before_any_work(refusals):
    folder, result, scratch = refusals["train: syntax error"]
    line = _one_line_error(result)
    assert f"{folder / 'pipeline.py'}: line 2:" in line, line
    assert not (scratch / "run-a" / "checkpoint-00002").exists() and "training pairs" not in result.stderr


def test_a_trusted_pipeline_py_that_fails_as_it_runs_is_a_problem_found_at_the_start(hubstyle_folders, tmp_path):
    # what the trainer checks before any work (the same function; the flag cases above run the script)
    from cachetrain.models.loading import folder_code_problem

    folder = tmp_path / "import-fails"
    shutil.copytree(hubstyle_folders["module-projection"], folder)
    code = (folder / "pipeline.py").read_text(encoding="utf-8")
    (folder / "pipeline.py").write_text("import no_such_package_here\n" + code, encoding="utf-8")
    problem = folder_code_problem(str(folder), trusted=True)
    assert problem.startswith(f"{folder / 'pipeline.py'}: failed while loading {PIPELINE_CLASS}"), problem
    assert "no_such_package_here" in problem
    assert folder_code_problem(str(hubstyle_folders["module-projection"]), trusted=True) is None
    assert "add --custom" in folder_code_problem(str(hubstyle_folders["module-projection"]), trusted=False)


@pytest.mark.slow
def test_a_custom_folder_trained_without_the_trust_flag_is_refused_saying_which_flag_to_add(refusals):
    folder, result, scratch = refusals["train: not trusted"]
    line = _one_line_error(result)
    assert str(folder / "pipeline.py") in line and "add --custom" in line, line
    assert "t5_projection/hub_projection.py" in line
    assert not list((scratch / "run-b").glob("checkpoint-*"))


# --- the flags ---------------------------------------------------------------------------------------------


def test_create_t5cache_says_in_its_help_that_it_implies_custom(capsys):
    from cachetrain.cache.t5_cache import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "it implies --custom" in " ".join(capsys.readouterr().out.split())


def test_is_custom_is_the_trainers_alias_of_custom():
    from cachetrain.train.config import parse_train_args

    common = ["--pretrained_model", "m", "--train_data_dir", "d"]
    assert parse_train_args(common + ["--custom"]).is_custom
    assert parse_train_args(common + ["--is_custom"]).is_custom
    assert not parse_train_args(common).is_custom


def test_reading_a_folders_code_names_each_class_and_file_without_running_it(hubstyle_folders):
    from cachetrain import t5  # noqa: F401  (names our pipeline class on diffusers)
    from cachetrain.models.pipeline_code import read_folder_code

    module = read_folder_code(hubstyle_folders["module-projection"])
    assert (module.pipeline.path.name, module.pipeline.class_name) == ("pipeline.py", PIPELINE_CLASS)
    assert [(e.entry, e.path.relative_to(module.folder).as_posix()) for e in module.components] == \
        [("t5_projection", "t5_projection/hub_projection.py")]
    ours = read_folder_code(hubstyle_folders["our-projection"])
    assert ours.pipeline is not None and ours.components == ()  # cachetrain.t5's projection needs no file
    assert not read_folder_code(_plain_t5_folder(hubstyle_folders)).carries_code


def _plain_t5_folder(hubstyle_folders) -> Path:
    """A folder of ours (StableDiffusionT5Pipeline, T5Projection): no code of its own."""
    folder = hubstyle_folders["module-projection"].parent / "plain"
    if not folder.exists():
        shutil.copytree(hubstyle_folders["module-projection"], folder)
        (folder / "pipeline.py").unlink()
        (folder / "t5_projection" / "hub_projection.py").unlink()
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        index.update(_class_name="StableDiffusionT5Pipeline", t5_projection=["cachetrain.t5", "T5Projection"])
        (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
