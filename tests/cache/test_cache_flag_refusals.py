"""Flags of the four cache scripts that would lose data or crash are refused at the start: one line naming the
flag, exit status 2, no traceback, nothing in the data root changed (before any model loads).

--out_suffix names the sidecars (x.jpg -> x<out_suffix>); one that is empty, lacks its leading ".", or is an
image extension or the caption suffix would make the run overwrite the user's images or captions, or make
--prune delete them as orphan sidecars. The rule is cachetrain.cache.build.out_suffix_problem.
"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.script_runs import run_script
from tests.t5_support import tiny_t5_model  # noqa: F401  (fixture)

IMAGE_SCRIPTS = ("create_img_sdvae.py", "create_img_sdxl.py")
TEXT_SCRIPTS = ("create_clipl.py", "create_t5cache_768.py")


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name, extension, color in (("a", ".jpg", (255, 0, 0)), ("b", ".png", (0, 0, 255))):
        Image.new("RGB", (40, 40), color).save(root / f"{name}{extension}")
        (root / f"{name}.txt").write_text(f"a {name} square")
        (root / f"{name}.cap").write_text(f"a {name} square, other captions")
    return root


def snapshot(root) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def run_refused(script: str, model, root, *flags) -> str:
    """Run ``script`` on ``root`` with ``flags``; assert it refused (status 2, one line, the data root untouched)
    and return that line."""
    before = snapshot(root)
    model_flags = ["--model", str(model)] if script != "create_t5cache_768.py" else ["--model", "no/such-t5-pipeline"]
    done = run_script(script, *model_flags, "--data_root", str(root), "--resolution", "32", "--num_workers", "0",
                      "--no_progress", "--prune", *flags) if script in IMAGE_SCRIPTS else \
        run_script(script, *model_flags, "--data_root", str(root), "--no_progress", "--prune", "--cpu", *flags)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert snapshot(root) == before
    return lines[0]


@pytest.mark.parametrize("script", IMAGE_SCRIPTS + TEXT_SCRIPTS)
@pytest.mark.parametrize("suffix", ["", "g", ".", "img_sdvae"])
def test_an_out_suffix_without_its_leading_dot_is_refused_before_prune_deletes_anything(
        tiny_sd_model, data_root, script, suffix):
    line = run_refused(script, tiny_sd_model, data_root, "--out_suffix", suffix)
    assert f"--out_suffix {suffix!r}: must start with '.'" in line


@pytest.mark.parametrize("script, flags, suffix", [
    ("create_img_sdvae.py", ["--extensions", ".jpg"], ".png"),  # an image the run does not take is still an image
    ("create_img_sdxl.py", [], ".JPG"),
    ("create_img_sdvae.py", ["--extensions", "jpg", "heic"], ".HEIC"),  # a --extensions one
    ("create_clipl.py", ["--extensions", ".png"], ".jpg"),
    ("create_t5cache_768.py", [], ".webp"),
])
def test_an_out_suffix_that_is_an_image_extension_is_refused(tiny_sd_model, data_root, script, flags, suffix):
    line = run_refused(script, tiny_sd_model, data_root, *flags, "--out_suffix", suffix)
    assert f"--out_suffix {suffix!r}: is an image extension" in line


@pytest.mark.parametrize("script, flags, suffix", [
    ("create_img_sdvae.py", [], ".txt"),
    ("create_img_sdxl.py", ["--caption_suffix", ".cap"], ".CAP"),
    ("create_clipl.py", [], ".TXT"),
    ("create_clipl.py", ["--caption_suffix", ".cap"], ".cap"),
    ("create_t5cache_768.py", ["--txt_suffix", ".cap"], ".cap"),
])
def test_an_out_suffix_that_is_the_caption_suffix_is_refused(tiny_sd_model, data_root, script, flags, suffix):
    line = run_refused(script, tiny_sd_model, data_root, *flags, "--out_suffix", suffix)
    assert f"--out_suffix {suffix!r}: is the caption suffix" in line


@pytest.mark.parametrize("script", IMAGE_SCRIPTS + TEXT_SCRIPTS)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_batch_size_under_one_is_refused_at_parse_time(tiny_sd_model, data_root, script, value):
    line = run_refused(script, tiny_sd_model, data_root, "--batch_size", value)
    assert f"argument --batch_size: {value}: must be an integer >= 1" in line


@pytest.mark.parametrize("script", IMAGE_SCRIPTS)
def test_a_negative_num_workers_is_refused_at_parse_time(tiny_sd_model, data_root, script):
    line = run_refused(script, tiny_sd_model, data_root, "--num_workers", "-1")
    assert "argument --num_workers: -1: must be an integer >= 0" in line


def test_a_dotted_suffix_of_its_own_still_runs(tiny_sd_model, data_root):
    done = run_script("create_img_sdvae.py", "--model", str(tiny_sd_model), "--data_root", str(data_root),
                      "--resolution", "32", "--num_workers", "0", "--no_progress", "--out_suffix", ".lat32")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in data_root.glob("*.lat32")) == ["a.lat32", "b.lat32"]


@pytest.mark.parametrize("script", IMAGE_SCRIPTS + TEXT_SCRIPTS)
@pytest.mark.parametrize("problem", ["data_root", "report"])
def test_a_missing_data_root_or_unwritable_report_is_named_before_the_encoder_loads(tmp_path, data_root, script,
                                                                                   problem):
    # --model names nothing that loads: a line about the folder or the report proves it was checked first
    # (a T5-xxl encoder takes minutes to load before a typo in --data_root would be seen)
    root = tmp_path / "no-such-data" if problem == "data_root" else data_root
    flags = ["--report", str(tmp_path / "no-such-folder" / "report.jsonl")] if problem == "report" else []
    done = run_script(script, "--model", str(tmp_path / "no-such-model"), "--data_root", str(root), "--cpu",
                      "--num_workers", "0", "--no_progress", *flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --data_root {root}: no such folder" if problem == "data_root" else
        f"error: --report {tmp_path / 'no-such-folder' / 'report.jsonl'}: cannot write it (No such file or directory)"]


def test_the_clip_cache_given_a_t5_pipeline_says_so_in_one_line(tiny_t5_model, data_root):
    # transformers would build a CLIP text model from the T5 config and fail at the first caption
    line = run_refused("create_clipl.py", tiny_t5_model, data_root)
    assert line == (f"error: could not load the CLIP tokenizer and text encoder of {tiny_t5_model}: its text_encoder "
                    "is a t5 model, not CLIP's text model (a T5 pipeline: create_t5cache_768.py caches its captions)")
