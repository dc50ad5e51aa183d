"""compare_imgdirs.py: runs' samples paired by relative path, one self-contained page, labelled PNGs.

Two small runs are written by hand. Every sample is one flat colour that says which run, step and
prompt it is, so a pixel tells whether the right image is in the right place.
"""

from __future__ import annotations

import pytest
from PIL import Image

from cachetrain.view import compare, compare_page, sample_runs, side_by_side
from cachetrain.models.sampling import SampleMetadata, save_sample_png
from tests.headless_chromium import HeadlessChromium, chromium_missing_reason
from tests.script_runs import run_script

PROMPTS = ["a red circle on a blue background", "a yellow </script> square <!-- <b>on black</b>"]
SAMPLE_NAMES = ["sample-00-a-red-circle-on-a-blue-background.png", "sample-01-a-yellow-script-square-b-on-black-b.png"]
SAMPLE_SIDE = 32


def colour(run: int, step: int, prompt_index: int) -> tuple[int, int, int]:
    return (40 + 150 * run, step // 100 * 60, 60 + 120 * prompt_index)


def write_samples(folder, run: int, step: int) -> None:
    folder.mkdir(parents=True)
    for index, (prompt, name) in enumerate(zip(PROMPTS, SAMPLE_NAMES)):
        metadata = SampleMetadata(prompt=prompt, negative_prompt="", seed=1234 + index, step=step,
                                  sampler_steps=20, guidance_scale=7.5)
        save_sample_png(Image.new("RGB", (SAMPLE_SIDE, SAMPLE_SIDE), colour(run, step, index)),
                        folder / name, metadata)


def write_run(root, run: int, steps: list[int]) -> None:
    for step in steps:
        write_samples(root / f"checkpoint-{step:05d}", run, step)


@pytest.fixture
def two_runs(tmp_path):
    """run_a has steps 100 and 200; run_b also has 300, and its step-200 second sample is damaged."""
    run_a, run_b = tmp_path / "demo_a" / "run", tmp_path / "demo_b" / "run"
    write_run(run_a, 0, [100, 200])
    write_run(run_b, 1, [100, 200, 300])
    (run_b / "checkpoint-00200" / SAMPLE_NAMES[1]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (run_a / "tensorboard").mkdir()
    Image.new("RGB", (4, 4)).save(run_a / "tensorboard" / "not-a-sample.webp")  # only png/jpg/jpeg/bmp are compared
    return run_a, run_b


def test_runs_are_named_by_the_fewest_path_parts_that_tell_them_apart(tmp_path):
    assert sample_runs.run_names([tmp_path / "demo_a" / "run", tmp_path / "demo_b" / "run"]) == ["demo_a/run", "demo_b/run"]
    assert sample_runs.run_names([tmp_path / "x" / "lr1e-4", tmp_path / "x" / "lr3e-4"]) == ["lr1e-4", "lr3e-4"]
    assert sample_runs.run_names([tmp_path / "same", tmp_path / "same"]) == ["same", "same #2"]


def test_images_are_paired_by_their_path_relative_to_each_run(two_runs):
    comparison = sample_runs.compare_runs(list(two_runs))

    assert [(s.folder, s.step, s.present) for s in comparison.steps] == [
        ("checkpoint-00100", 100, [True, True]), ("checkpoint-00200", 200, [True, True]),
        ("checkpoint-00300", 300, [False, True])]
    first = comparison.steps[0]
    assert first.names == SAMPLE_NAMES
    assert [images[SAMPLE_NAMES[0]].metadata.prompt for images in first.images] == [PROMPTS[0], PROMPTS[0]]
    assert first.prompt(SAMPLE_NAMES[1]) == PROMPTS[1]
    assert comparison.mismatches == ["checkpoint-00300: only in demo_b/run (not in demo_a/run)"]
    ((run, path, problem),) = comparison.unreadable
    assert (run, path) == ("demo_b/run", f"checkpoint-00200/{SAMPLE_NAMES[1]}") and problem


def test_an_image_one_run_lacks_in_a_step_both_have_is_reported(two_runs):
    run_a, _run_b = two_runs
    (run_a / "checkpoint-00100" / SAMPLE_NAMES[0]).unlink()
    comparison = sample_runs.compare_runs(list(two_runs))
    assert comparison.mismatches == [f"checkpoint-00100/{SAMPLE_NAMES[0]}: not in demo_a/run",
                                     "checkpoint-00300: only in demo_b/run (not in demo_a/run)"]
    assert comparison.steps[0].prompt(SAMPLE_NAMES[0]) == PROMPTS[0]  # read from the run that has it


def test_runs_without_any_sample_image_are_an_error(tmp_path, capsys):
    (tmp_path / "empty_a").mkdir()
    (tmp_path / "empty_b").mkdir()
    assert compare.main([str(tmp_path / "empty_a"), str(tmp_path / "empty_b"), "--out", str(tmp_path / "c.html")]) == 1
    assert "no images (.png, .jpg, .jpeg, .bmp)" in capsys.readouterr().err


def test_mismatched_runs_are_reported_and_the_page_still_written(two_runs, tmp_path, capsys):
    out = tmp_path / "pages" / "compare.html"
    assert compare.main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0

    report = capsys.readouterr().err
    assert "3 steps, 2 in every run" in report
    assert "checkpoint-00300: only in demo_b/run (not in demo_a/run)" in report
    assert f"unreadable image demo_b/run: checkpoint-00200/{SAMPLE_NAMES[1]}" in report
    page = out.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4 + 3 + 2  # every readable sample, embedded
    assert "</script> square" not in page and "<!-- <b>" not in page  # a prompt cannot break the page's script


def test_a_missing_run_folder_is_an_error_that_names_it(two_runs, tmp_path, capsys):
    assert compare.main([str(two_runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "c.html")]) == 2
    assert f"run folder not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "c.html").exists()


def test_view_opens_the_written_page_in_the_default_browser(two_runs, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(compare.webbrowser, "open", opened.append)
    out = tmp_path / "compare.html"
    assert compare.main([*map(str, two_runs), "--out", str(out), "--view"]) == 0
    assert opened == [out.resolve().as_uri()]


def test_side_by_side_pngs_put_each_run_in_its_column_for_every_matched_step(two_runs, tmp_path):
    png_dir = tmp_path / "side-by-side"
    assert compare.main([*map(str, two_runs), "--out", str(tmp_path / "c.html"), "--png", str(png_dir)]) == 0
    assert sorted(p.name for p in png_dir.iterdir()) == ["checkpoint-00100.png", "checkpoint-00200.png"]

    # 32 px samples are enlarged 8x to 256 px tiles. Width: 8 padding + 2 runs x (256 tile + 8 padding).
    # Height: 8 padding + 24 title + 20 run names + 2 prompts x (20 prompt line + 256 tile + 8 padding).
    tile, width, height = 256, 8 + 2 * (256 + 8), 8 + 24 + 20 + 2 * (20 + 256 + 8)

    def tile_pixel(image, run, row, dx=tile // 2, dy=tile // 2):
        left = 8 + run * (tile + 8)
        top = 8 + 24 + 20 + row * (20 + tile + 8) + 20
        return image.getpixel((left + dx, top + dy))

    for step in (100, 200):
        image = Image.open(png_dir / f"checkpoint-{step:05d}.png").convert("RGB")
        assert image.size == (width, height)
        for run in (0, 1):
            for row in (0, 1):
                if (step, run, row) == (200, 1, 1):
                    continue  # the damaged one, checked below
                assert tile_pixel(image, run, row) == colour(run, step, row)
                assert tile_pixel(image, run, row, dx=0, dy=0) == colour(run, step, row)  # the whole tile
                assert tile_pixel(image, run, row, dx=tile - 1, dy=tile - 1) == colour(run, step, row)
    damaged = Image.open(png_dir / "checkpoint-00200.png").convert("RGB")
    assert tile_pixel(damaged, 1, 1, dx=192, dy=32) == side_by_side.PNG_GAP  # a marked gap in its place
    assert tile_pixel(damaged, 1, 1, dx=0, dy=0) == side_by_side.PNG_GAP_MARK


def test_flat_folders_of_sampled_images_get_a_side_by_side_png_with_a_name(tmp_path):
    # sample_images.py --out DIR writes its PNGs straight into DIR: the comparison's one step is "."
    write_samples(tmp_path / "out_a", 0, 0)
    write_samples(tmp_path / "out_b", 1, 0)
    png_dir = tmp_path / "side-by-side"
    result = run_script("compare_imgdirs.py", tmp_path / "out_a", tmp_path / "out_b", "--out", tmp_path / "c.html",
                        "--png", png_dir)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in png_dir.iterdir()) == [side_by_side.TOP_FOLDER_PNG]
    image = Image.open(png_dir / side_by_side.TOP_FOLDER_PNG).convert("RGB")
    tile = 256  # 32 px samples enlarged 8x; first prompt row, centre of each run's tile
    for run in (0, 1):
        assert image.getpixel((8 + run * (tile + 8) + tile // 2, 8 + 24 + 20 + 20 + tile // 2)) == colour(run, 0, 0)


@pytest.mark.parametrize("case", ["--out an existing folder", "--out inside a file", "--png an existing file",
                                  "--png inside a file"])
def test_output_paths_that_cannot_be_written_are_refused_in_one_line_before_the_page_is_built(two_runs, tmp_path,
                                                                                              case, monkeypatch):
    monkeypatch.setattr(compare, "compare_runs", lambda *a: pytest.fail("the runs were read before the check"))
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    out, png = tmp_path / "c.html", tmp_path / "pngs"
    if case == "--out an existing folder":
        out, expected = tmp_path / "a-folder", f"--out {tmp_path / 'a-folder'}: an existing folder"
    elif case == "--out inside a file":
        out = tmp_path / "a-file" / "c.html"
        expected = f"--out {out}: {tmp_path / 'a-file'} is a file, not a folder"
    elif case == "--png an existing file":
        png, expected = tmp_path / "a-file", f"--png {tmp_path / 'a-file'}: an existing file, not a folder"
    else:
        png = tmp_path / "a-file" / "pngs"
        expected = f"--png {png}: {tmp_path / 'a-file'} is a file, not a folder"
    result = run_script("compare_imgdirs.py", *two_runs, "--out", out, "--png", png)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "demo_a", "demo_b"]  # nothing left
    assert (tmp_path / "a-file").read_text() == "not a folder" and not any((tmp_path / "a-folder").iterdir())



def test_a_negative_skip_is_refused_before_the_runs_are_read(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "compare_runs", lambda *a: pytest.fail("the runs were read before the check"))
    with pytest.raises(SystemExit) as stopped:
        compare.main([*map(str, two_runs), "--skip", "-1", "--out", str(tmp_path / "c.html")])
    assert stopped.value.code == 2 and "--skip -1: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "c.html").exists()

CELLS_OF_SHOWN_STEP = """
Promise.all([...document.querySelectorAll("#step-view img")].map(img => img.decode())).then(() =>
  [...document.querySelectorAll("#step-view tbody tr")].map(tr => ({
    prompt: tr.querySelector("td.prompt").textContent,
    cells: [...tr.querySelectorAll("td.cell")].map(td => {
      const img = td.querySelector("img");
      if (!img) return {gap: td.querySelector(".gap").className};
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      const [r, g, b] = context.getImageData(img.naturalWidth >> 1, img.naturalHeight >> 1, 1, 1).data;
      return {run: img.dataset.run, width: img.naturalWidth, shownWidth: img.width, rgb: [r, g, b],
              facts: td.querySelector(".facts").textContent};
    })})))
"""


def test_the_page_works_in_a_real_headless_browser(two_runs, tmp_path, artifacts_dir):
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    run_b = two_runs[1]
    # the same file name holding another prompt in one run: the page must say so under that image
    save_sample_png(Image.new("RGB", (SAMPLE_SIDE, SAMPLE_SIDE), colour(1, 100, 0)),
                    run_b / "checkpoint-00100" / SAMPLE_NAMES[0],
                    SampleMetadata(prompt="another prompt", negative_prompt="blurry", seed=1234, step=100,
                                   sampler_steps=20, guidance_scale=7.5))
    out = tmp_path / "compare.html"
    assert compare.main([*map(str, two_runs), "--out", str(out)]) == 0

    def image(run, step, row, facts_before="", facts_after=""):
        return {"run": ["demo_a/run", "demo_b/run"][run], "width": SAMPLE_SIDE, "shownWidth": pytest.approx(480, abs=1),
                "rgb": list(colour(run, step, row)), "facts": facts_before + f"step {step} \u00b7 seed {1234 + row} "
                f"\u00b7 20 sampler steps \u00b7 guidance 7.5" + facts_after}

    with HeadlessChromium(tmp_path / "profile") as browser:
        browser.open(out.as_uri())
        assert browser.evaluate("document.body.dataset.stepIndex") == "0"
        assert browser.evaluate("document.getElementById('step-label').textContent") == \
            "step 100 (checkpoint-00100) \u2014 1 of 3"
        assert browser.evaluate(CELLS_OF_SHOWN_STEP) == [
            {"prompt": PROMPTS[0], "cells": [image(0, 100, 0), image(1, 100, 0, "prompt: another prompt \u00b7 ",
                                                                     " \u00b7 negative: blurry")]},
            {"prompt": PROMPTS[1], "cells": [image(0, 100, 1), image(1, 100, 1)]}]
        assert "checkpoint-00300: only in demo_b/run" in browser.evaluate(
            "document.getElementById('mismatches').textContent")
        browser.screenshot(artifacts_dir / "compare-step-100.png")

        browser.press("ArrowRight", "ArrowRight", 39)
        assert browser.evaluate("document.body.dataset.stepIndex") == "1"
        assert browser.evaluate("document.getElementById('step-label').textContent").startswith("step 200 ")
        assert browser.evaluate(CELLS_OF_SHOWN_STEP) == [
            {"prompt": PROMPTS[0], "cells": [image(0, 200, 0), image(1, 200, 0)]},
            {"prompt": PROMPTS[1], "cells": [image(0, 200, 1), {"gap": "gap unreadable"}]}]
        browser.screenshot(artifacts_dir / "compare-step-200-unreadable.png")

        browser.press(" ", "Space", 32)
        assert browser.evaluate(CELLS_OF_SHOWN_STEP)[0]["cells"] == [{"gap": "gap missing"}, image(1, 300, 0)]
        browser.press(" ", "Space", 32)  # already at the last step: stays
        assert browser.evaluate("document.body.dataset.stepIndex") == "2"
        browser.press("Backspace", "Backspace", 8)
        browser.press("ArrowLeft", "ArrowLeft", 37)
        assert browser.evaluate("document.body.dataset.stepIndex") == "0"

        browser.press("g", "KeyG", 71)
        assert browser.evaluate("document.body.dataset.view") == "grid"
        assert browser.evaluate("[...document.querySelectorAll('#grid tbody tr')].map(tr => tr.cells[0].textContent)"
                                ) == ["step 100", "step 200", "step 300"]
        assert browser.evaluate("document.querySelectorAll('#grid img').length") == 9
        browser.screenshot(artifacts_dir / "compare-grid.png")

        assert browser.console_errors() == []
        assert [url for url in browser.requested_urls() if not url.startswith("data:")] == [out.as_uri()]


def test_a_linked_page_refers_to_the_images_where_they_are(two_runs, tmp_path):
    # elsewhere than the runs, through a link to a deeper folder: the paths must lead back from where
    # the browser opens the page
    pages = tmp_path / "pages"
    (tmp_path / "deeper" / "real-pages").mkdir(parents=True)
    pages.symlink_to(tmp_path / "deeper" / "real-pages")
    out = pages / "compare.html"
    assert compare.main([*map(str, two_runs), "--out", str(out), "--link"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "data:image/png" not in page and "../demo_a/run/checkpoint-00100/" in page
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    readable = {run / f"checkpoint-{step:05d}" / name for run, steps in zip(two_runs, ([100, 200], [100, 200, 300]))
                for step in steps for name in SAMPLE_NAMES} - {two_runs[1] / "checkpoint-00200" / SAMPLE_NAMES[1]}

    shown = """Promise.all([...document.querySelectorAll("#grid img")].map(img => img.decode())).then(() =>
      [...document.querySelectorAll("#grid img")].map(img => [img.src, img.naturalWidth]))"""
    with HeadlessChromium(tmp_path / "profile") as browser:
        browser.open(out.as_uri())
        browser.press("g", "KeyG", 71)
        images = browser.evaluate(shown)
        assert sorted(src for src, _ in images) == sorted(path.as_uri() for path in readable)
        assert {width for _, width in images} == {SAMPLE_SIDE}
        assert browser.console_errors() == []


def test_the_facts_under_an_image_name_a_forced_token_length(tmp_path):
    folder = tmp_path / "run" / "checkpoint-00100"
    folder.mkdir(parents=True)
    save_sample_png(Image.new("RGB", (SAMPLE_SIDE, SAMPLE_SIDE)), folder / SAMPLE_NAMES[0],
                    SampleMetadata(prompt="p", negative_prompt="", seed=1, step=100, sampler_steps=20,
                                   guidance_scale=7.5, token_length=60))
    [cell] = compare_page.page_data(sample_runs.compare_runs([tmp_path / "run"]))["steps"][0]["rows"][0]["cells"]
    assert cell["facts"] == ("step 100 \u00b7 seed 1 \u00b7 20 sampler steps \u00b7 guidance 7.5 "
                             "\u00b7 conditioned on 60 tokens")


def test_the_original_samplers_images_of_any_type_pair_by_relative_path_and_skip_leaves_out_the_first(tmp_path, capsys):
    # imgsamplesd.py writes sample{i}_s{seed}.png into the model folder; jpg and bmp pair the same way
    names = ["sample0_s90.png", "sample1_s90.png", "sub/photo.jpg", "sub/scan.bmp"]
    for run, folder in enumerate(("model_a", "model_b")):
        for index, name in enumerate(names):
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (100 * run, 50 * index, 0)).save(tmp_path / folder / name)
    out = tmp_path / "page.html"
    assert compare.main([str(tmp_path / "model_a"), str(tmp_path / "model_b"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "data:image/jpeg;base64," in page and "data:image/bmp;base64," in page
    comparison = sample_runs.compare_runs([tmp_path / "model_a", tmp_path / "model_b"])
    assert [(step.folder, step.names) for step in comparison.steps] == [
        (".", ["sample0_s90.png", "sample1_s90.png"]), ("sub", ["photo.jpg", "scan.bmp"])]
    assert not comparison.mismatches

    skipped = sample_runs.skip_matches(comparison, 3)
    assert [(step.folder, step.names) for step in skipped.steps] == [("sub", ["scan.bmp"])]
    assert [sorted(images) for images in skipped.steps[0].images] == [["scan.bmp"], ["scan.bmp"]]
    assert compare.main([str(tmp_path / "model_a"), str(tmp_path / "model_b"), "--skip", "3", "--out", str(out)]) == 0
    assert "photo.jpg" not in out.read_text() and "scan.bmp" in out.read_text()
    assert compare.main([str(tmp_path / "model_a"), str(tmp_path / "model_b"), "--skip", "4", "--out", str(out)]) == 1
    assert "after --skip 4" in capsys.readouterr().err
