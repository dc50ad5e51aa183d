"""The original scripts' file names: captions under another suffix (x.txtqs, --caption_suffix / --txt_suffix) and
previews beside sidecars (x.img_sdvae.webp, --write_preview), never orphans, never pruned, never sources."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from cachetrain.view import inspect as cache_inspect
from cachetrain import freshness, sidecar
from cachetrain.cache.text_cache import main_clip

from tests.conftest import CACHED_RESOLUTION, REPO_ROOT
from .test_cache_builders import IMAGES_IN_DATASET, run_images, summary_counts


def rename_captions(root, suffix: str) -> None:
    for caption in root.rglob("*.txt"):
        caption.rename(caption.with_suffix(suffix))


def run_captions(capsys, model, root, *extra) -> tuple[int, dict[str, int], str]:
    capsys.readouterr()
    status = main_clip(["--model", str(model), "--data_root", str(root), "--no_progress", "--save_dtype", "float32",
                        *extra])
    err = capsys.readouterr().err
    return status, summary_counts(err), err


def test_captions_named_as_the_original_names_them_are_cached_inspected_and_never_pruned(capsys, tiny_sd_model,
                                                                                         cached_dataset):
    rename_captions(cached_dataset, ".txtqs")
    embeddings = sorted(p for p in cached_dataset.rglob("*.txt_clipl") if not p.name.startswith("."))
    # The original's flag name: the captions' bytes are unchanged, so every embedding is still fresh
    status, counts, err = run_captions(capsys, tiny_sd_model, cached_dataset, "--txt_suffix", ".txtqs", "--prune")
    assert status == 0, err
    assert counts["fresh"] == IMAGES_IN_DATASET and "orphan" not in err
    assert all(path.exists() for path in embeddings)
    # a caption changed under the new name is rebuilt from it, and the sidecar records the caption's suffix
    first_caption = cached_dataset / "part0" / "img00000.txtqs"
    first_caption.write_text("a new caption\n")
    status, counts, _ = run_captions(capsys, tiny_sd_model, cached_dataset, "--caption_suffix", ".txtqs", "--prune")
    assert status == 0 and counts["stale"] == 1 and counts["written"] == 1
    rebuilt = sidecar.read_metadata(first_caption.with_suffix(".txt_clipl"))
    assert rebuilt["caption_suffix"] == ".txtqs"
    assert rebuilt["caption_sha256"] == freshness.caption_source_identity("a new caption")["caption_sha256"]
    # inspect finds the captions of sidecars that record their suffix; the flag names them for all the others
    report = cache_inspect.inspect_cache([str(cached_dataset)], [".txt_clipl"])["suffixes"][".txt_clipl"]
    assert report["status"]["fresh"] == 1 and report["status"]["orphan"] == IMAGES_IN_DATASET - 1
    report = cache_inspect.inspect_cache([str(cached_dataset)], [".txt_clipl"],
                                         caption_suffix=".txtqs")["suffixes"][".txt_clipl"]
    assert report["status"]["fresh"] == IMAGES_IN_DATASET and report["status"]["orphan"] == 0


def test_both_text_scripts_take_the_caption_suffix_flag_under_both_names():
    for script in ("create_clipl.py", "create_t5cache_768.py"):
        done = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        assert "--caption_suffix CAPTION_SUFFIX, --txt_suffix CAPTION_SUFFIX" in done.stdout, script


def test_write_preview_writes_the_decoded_latent_beside_each_sidecar_and_previews_are_never_sources(
        capsys, tiny_sd_model, shapes_dataset):
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--write_preview")
    assert status == 0 and counts["written"] == IMAGES_IN_DATASET
    previews = sorted(shapes_dataset.rglob("*.img_sdvae.webp"))
    assert len(previews) == IMAGES_IN_DATASET
    with Image.open(previews[0]) as preview:
        assert preview.format == "WEBP" and preview.size == (CACHED_RESOLUTION, CACHED_RESOLUTION)  # run_images' size
    assert oct(os.stat(previews[0]).st_mode & 0o777) == oct(sidecar.FILE_MODE)
    # the original's previews, also of other suffixes: neither sources (no x.img_sdvae.img_sdvae) nor orphans
    Image.new("RGB", (64, 64)).save(shapes_dataset / "part1" / "img00001.img_sdxl.png")
    status, counts, err = run_images(capsys, tiny_sd_model, shapes_dataset, "--prune")
    assert status == 0 and counts["fresh"] == IMAGES_IN_DATASET and counts["written"] == 0
    assert "orphan" not in err
    assert not list(shapes_dataset.rglob("*.img_sdvae.img_sdvae")) and not list(shapes_dataset.rglob("*.img_sdxl.img_sdvae"))
    assert len(list(shapes_dataset.rglob("*.img_sdvae.webp"))) == IMAGES_IN_DATASET
    report = cache_inspect.inspect_cache([str(shapes_dataset)], [".img_sdvae"])["suffixes"][".img_sdvae"]
    assert report["count"] == IMAGES_IN_DATASET and report["status"]["fresh"] == IMAGES_IN_DATASET


def test_the_one_source_rule_takes_images_and_leaves_files_made_from_sidecars():
    extensions = (".jpg", ".png", ".webp")
    assert sidecar.is_source_image("x.jpg", extensions)
    assert sidecar.is_source_image("x.WEBP", extensions)
    assert not sidecar.is_source_image("x.img_sdvae.webp", extensions)
    assert not sidecar.is_source_image("x.IMG_SDXL.png", extensions)
    assert not sidecar.is_source_image("x.mine.webp", extensions, (".mine",))
    assert not sidecar.is_source_image("x.txt", extensions)
    assert sidecar.preview_path("/d/x.img_sdvae").name == "x.img_sdvae.webp"
