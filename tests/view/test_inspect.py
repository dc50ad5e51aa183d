"""python -m cachetrain.inspect: exact counts and statistics of a small cache with planted problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cachetrain.view import inspect as cache_inspect
from cachetrain.freshness import caption_source_identity, image_source_identity
from cachetrain.sidecar import write_sidecar

ENCODER = {"kind": "image_latent", "encoder": "tiny", "encoder_class": "AutoencoderKL", "encoder_fingerprint": "abc",
           "resolution": "64"}
TEXT_ENCODER = {"kind": "text_embedding", "encoder": "tiny", "encoder_class": "CLIPTextModel",
                "encoder_fingerprint": "def", "max_length": "7"}


def exact(value):
    """Equal up to float64 rounding: the report merges per-file moments, the test computes in one go."""
    return pytest.approx(value, rel=1e-12, abs=1e-12)


@pytest.fixture
def planted_cache(tmp_path):
    """Nine latent and seven text sidecars with one of each problem; returns (root, what was written)."""
    root = tmp_path / "cache"
    generator = torch.Generator().manual_seed(0)
    latents, embeddings = {}, {}

    def add_image(folder, stem, latent, caption, embedding):
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"{stem}.png"
        Image.new("RGB", (8, 8), (len(stem) * 20, 0, 0)).save(image)
        (folder / f"{stem}.txt").write_text(f" {caption} \n", encoding="utf-8")
        write_sidecar(folder / f"{stem}.img_sdvae", {"latent": latent}, {**ENCODER, **image_source_identity(image)})
        write_sidecar(folder / f"{stem}.txt_clipl", {"emb": embedding},
                      {**TEXT_ENCODER, **caption_source_identity(caption)})
        latents[stem], embeddings[stem] = latent, embedding

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=generator) * scale + shift

    for i in range(6):
        add_image(root / "a", f"img{i}", randn(4, 8, 8, scale=3.0, shift=i), f"caption {i}", randn(7, 8))
    add_image(root / "a" / "b", "img6", randn(4, 8, 8, scale=3.0), "caption 6", randn(7, 8))

    # stale: the image was replaced after caching; and caption 0 was edited
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "a" / "img1.png")
    (root / "a" / "img0.txt").write_text("an edited caption", encoding="utf-8")
    # legacy: written by the original scripts, without metadata
    save_file({"latent": latents["img2"]}, root / "a" / "img2.img_sdvae")
    # NaN and Inf
    latents["img3"] = latents["img3"].clone()
    latents["img3"][0, 0, :2] = float("nan")
    latents["img3"][1, 2, 3] = float("inf")
    write_sidecar(root / "a" / "img3.img_sdvae", {"latent": latents["img3"]},
                  {**ENCODER, **image_source_identity(root / "a" / "img3.png")})
    # odd shapes
    latents["img4"] = randn(4, 8, 6)
    write_sidecar(root / "a" / "img4.img_sdvae", {"latent": latents["img4"]},
                  {**ENCODER, **image_source_identity(root / "a" / "img4.png")})
    embeddings["img2"] = randn(5, 8)
    write_sidecar(root / "a" / "img2.txt_clipl", {"emb": embeddings["img2"]},
                  {**TEXT_ENCODER, **caption_source_identity("caption 2")})
    # another dtype
    latents["img5"] = latents["img5"].half()
    write_sidecar(root / "a" / "img5.img_sdvae", {"latent": latents["img5"]},
                  {**ENCODER, **image_source_identity(root / "a" / "img5.png")})
    # orphans: a latent whose image is gone, an embedding whose caption is gone
    latents["gone"] = randn(4, 8, 8)
    write_sidecar(root / "a" / "gone.img_sdvae", {"latent": latents["gone"]},
                  {**ENCODER, "source_size": "1", "source_mtime_ns": "1"})
    (root / "a" / "img5.txt").unlink()
    # unreadable
    (root / "a" / "broken.png").write_bytes(b"not really")
    (root / "a" / "broken.img_sdvae").write_bytes(b"\x00 garbage")
    return root, latents, embeddings


def test_counts_statuses_shapes_and_broken_files_are_exact(planted_cache):
    root, _latents, _embeddings = planted_cache
    a = str(root / "a")
    result = cache_inspect.inspect_cache([str(root)])
    latent_report, text_report = result["suffixes"][".img_sdvae"], result["suffixes"][".txt_clipl"]

    assert list(result["suffixes"]) == [".img_sdvae", ".txt_clipl"]  # no .img_sdxl / .txt_t5cache here
    assert latent_report["count"] == 9
    assert latent_report["kinds"] == {"image_latent": 8}
    assert latent_report["status"] == {"fresh": 5, "retimed": 0, "stale": 1, "legacy": 1, "orphan": 1,
                                       "unreadable": 1}
    by_path = {f["path"]: (f["status"], f["reason"]) for f in latent_report["not_fresh"]}
    assert sorted(by_path) == sorted(f"{a}/{name}.img_sdvae" for name in ("img1", "img2", "gone", "broken"))
    assert by_path[f"{a}/img1.img_sdvae"][0] == "stale" and "source_size" in by_path[f"{a}/img1.img_sdvae"][1]
    assert by_path[f"{a}/img2.img_sdvae"][0] == "legacy"
    assert by_path[f"{a}/gone.img_sdvae"] == ("orphan", "its source file is gone")
    assert by_path[f"{a}/broken.img_sdvae"][0] == "unreadable"
    assert latent_report["dtypes"] == {"float32": 7, "float16": 1}
    assert latent_report["shapes"] == {"4x8x8": 7, "4x8x6": 1}
    assert latent_report["usual_shape"] == [4, 8, 8]
    assert latent_report["odd_shape_files"] == [{"path": f"{a}/img4.img_sdvae", "shape": [4, 8, 6]}]
    assert latent_report["non_finite_count"] == 1
    assert latent_report["non_finite_files"] == [{"path": f"{a}/img3.img_sdvae", "nan": 2, "inf": 1}]
    assert latent_report["encoders"] == {"tiny (AutoencoderKL, fingerprint abc)": 7}

    assert text_report["count"] == 7
    assert text_report["status"] == {"fresh": 5, "retimed": 0, "stale": 1, "legacy": 0, "orphan": 1,
                                     "unreadable": 0}
    text_by_path = {f["path"]: f["status"] for f in text_report["not_fresh"]}
    assert text_by_path == {f"{a}/img0.txt_clipl": "stale", f"{a}/img5.txt_clipl": "orphan"}
    assert text_report["shapes"] == {"7x8": 6, "5x8": 1}
    assert text_report["odd_shape_files"] == [{"path": f"{a}/img2.txt_clipl", "shape": [5, 8]}]


def test_latent_statistics_and_scaling_factor_are_exact_and_leave_out_nan_files(planted_cache):
    root, latents, _embeddings = planted_cache
    latent = cache_inspect.inspect_cache([str(root)])["suffixes"][".img_sdvae"]["latent"]

    # every finite 4-channel latent, whatever its size or dtype; not img3 (NaN), not the unreadable file
    used = [latents[name] for name in ("img0", "img1", "img2", "img4", "img5", "gone", "img6")]
    per_channel = torch.cat([t.double().reshape(4, -1) for t in used], dim=1)
    assert latent["channels"] == 4 and latent["files"] == 7
    assert latent["channel_mean"] == exact(per_channel.mean(dim=1).tolist())
    assert latent["channel_std"] == exact(per_channel.std(dim=1, unbiased=False).tolist())
    assert latent["mean"] == exact(per_channel.mean().item())
    all_std = per_channel.std(unbiased=False).item()
    assert latent["std"] == exact(all_std)
    assert latent["suggested_scaling_factor"] == exact(1 / all_std)


def test_text_embedding_token_norms_are_exact(planted_cache):
    root, _latents, embeddings = planted_cache
    norms_report = cache_inspect.inspect_cache([str(root)])["suffixes"][".txt_clipl"]["embedding_token_norms"]

    norms = torch.cat([embeddings[f"img{i}"].double().norm(dim=-1) for i in range(7)])
    assert norms_report["files"] == 7 and norms_report["tokens"] == 6 * 7 + 5
    assert norms_report["mean"] == exact(norms.mean().item())
    assert norms_report["std"] == exact(norms.std(unbiased=False).item())
    assert (norms_report["min"], norms_report["max"]) == (exact(norms.min().item()), exact(norms.max().item()))


def test_suffix_flag_limits_the_report_to_those_sidecars(planted_cache):
    root, _latents, _embeddings = planted_cache
    result = cache_inspect.inspect_cache([str(root / "a" / "b")], [".txt_clipl"])
    assert list(result["suffixes"]) == [".txt_clipl"]
    assert result["suffixes"][".txt_clipl"]["status"]["fresh"] == 1


def test_latents_of_images_with_other_extensions_are_orphans_unless_those_extensions_are_named(planted_cache):
    root, _latents, _embeddings = planted_cache
    folder = root / "a" / "b"
    (folder / "img6.png").rename(folder / "img6.jxl")
    default = cache_inspect.inspect_cache([str(folder)], [".img_sdvae"])["suffixes"][".img_sdvae"]["status"]
    assert (default["fresh"], default["orphan"]) == (0, 1)
    named = cache_inspect.inspect_cache([str(folder)], [".img_sdvae"], image_extensions=("JXL",))
    assert (named["suffixes"][".img_sdvae"]["status"]["fresh"], named["suffixes"][".img_sdvae"]["status"]["orphan"]) == (1, 0)


def test_the_text_report_names_the_problems(planted_cache, capsys):
    root, _latents, _embeddings = planted_cache
    assert cache_inspect.main([str(root), "--no_progress"]) == 1  # it found broken files
    captured = capsys.readouterr()
    text = captured.out
    assert captured.err.strip().splitlines()[-1] == \
        f"{cache_inspect.broken_count(cache_inspect.inspect_cache([str(root)]))} sidecars cannot be trained on " \
        "(unreadable, NaN/Inf or an odd shape)"
    assert ".img_sdvae: 9 sidecars (8 image latents)" in text
    assert "fresh 5, retimed 0, stale 1, legacy 1, orphan 1, unreadable 1" in text
    assert f"1 files differ from the usual shape 4x8x8:\n    {root}/a/img4.img_sdvae: 4x8x6" in text
    assert f"{root}/a/img3.img_sdvae: 2 NaN, 1 Inf" in text
    assert "suggested VAE scaling factor" in text
    assert "token embedding norms over 47 tokens in 7 files" in text


def test_module_runs_as_a_command_with_json_and_a_progress_bar(planted_cache):
    root, _latents, _embeddings = planted_cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cachetrain.inspect", str(root), "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1  # an unreadable, a NaN/Inf and an odd-shaped latent are planted
    assert json.loads(done.stdout) == cache_inspect.inspect_cache([str(root)])
    assert "inspecting: 100%" in done.stderr and "16/16" in done.stderr


def test_a_missing_folder_is_an_error_that_names_it(tmp_path, capsys):
    assert cache_inspect.main([str(tmp_path / "nope")]) == 2
    assert f"cache folder not found: {tmp_path / 'nope'}" in capsys.readouterr().err


def test_sidecars_written_by_the_cache_builders_are_fresh_until_their_source_changes(cached_dataset):
    images = sorted(cached_dataset.rglob("*.jpg"))
    stat = images[0].stat()
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: same bytes, new mtime
    Image.new("RGB", (70, 70), (9, 9, 9)).save(images[1])  # replaced

    result = cache_inspect.inspect_cache([str(cached_dataset)])
    assert result["suffixes"][".img_sdvae"]["status"] == {"fresh": 46, "retimed": 1, "stale": 1, "legacy": 0,
                                                          "orphan": 0, "unreadable": 0}
    assert result["suffixes"][".txt_clipl"]["status"]["fresh"] == 48


def test_the_exit_status_is_zero_for_a_sound_cache_and_one_for_each_kind_of_broken_file(cached_dataset):
    def inspect_status() -> int:
        return cache_inspect.main([str(cached_dataset), "--no_progress"])

    assert inspect_status() == 0
    latents = sorted(cached_dataset.rglob("*.img_sdvae"))
    stale_image = sorted(cached_dataset.rglob("*.jpg"))[5]
    Image.new("RGB", (70, 70), (9, 9, 9)).save(stale_image)  # stale is for the cache scripts to fix, not broken
    assert inspect_status() == 0
    for break_it in (lambda path: path.write_bytes(b"broken"),
                     lambda path: save_file({"latent": torch.full((4, 16, 16), float("nan"))}, path),
                     lambda path: save_file({"latent": torch.zeros(4, 16, 12)}, path)):
        kept = latents[0].read_bytes()
        break_it(latents[0])
        assert inspect_status() == 1
        latents[0].write_bytes(kept)
    assert inspect_status() == 0


def test_help_says_what_the_exit_status_means(capsys):
    with pytest.raises(SystemExit):
        cache_inspect.main(["--help"])
    assert "Exit status: 0 when every sidecar can be trained on; 1 when any is unreadable" in \
        " ".join(capsys.readouterr().out.split())


def test_one_orphan_rule_decides_for_the_builders_prune_and_the_inspector(tmp_path, capsys, tiny_sd_model):
    """Same tree, same verdict: the sidecars --prune removes are exactly those the inspector calls orphans."""
    from tests.cache.test_cache_builders import run_captions, run_images

    root = tmp_path / "data"
    root.mkdir()

    def image(name):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(root / name)

    def latent(stem):
        write_sidecar(root / f"{stem}.img_sdvae", {"latent": torch.zeros(4, 2, 2)}, {})  # legacy: kept, not rebuilt

    def embedding(stem):
        write_sidecar(root / f"{stem}.txt_clipl", {"emb": torch.zeros(3, 8)}, {})

    for stem, image_name in (("kept", "kept.png"), ("upper", "upper.PNG"), ("c", "C.png"), ("tif", "tif.tif")):
        image(image_name)
        latent(stem)
    (root / "jxl.jxl").write_bytes(b"an image of an extension no one named")
    latent("jxl")
    latent("gone")
    latent("preview")
    (root / "preview.img_sdvae.webp").write_bytes(b"a preview is made from a sidecar, never a source of one")
    for stem, caption in (("kept", "a red square"), ("tif", "a red square"), ("nocaption", None)):
        if caption:
            (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
        else:
            image(f"{stem}.png")
        embedding(stem)
    embedding("noimage")
    (root / "noimage.txt").write_text("its image is gone", encoding="utf-8")

    report = cache_inspect.inspect_cache([str(root)], [".img_sdvae", ".txt_clipl"], image_extensions=(".png",))
    said_orphan = {Path(entry["path"]).name for suffix in report["suffixes"].values()
                   for entry in suffix["not_fresh"] if entry["status"] == "orphan"}
    before = {path.name for path in root.iterdir()}
    run_images(capsys, tiny_sd_model, root, "--extensions", "png", "--prune")
    run_captions(capsys, tiny_sd_model, root, "--extensions", "png", "--prune")
    pruned = before - {path.name for path in root.iterdir()}

    # C.png's sidecar is C.img_sdvae (names compare exactly); tif.tif is an image of a default extension
    # that this run leaves out, so its sidecars are kept; a .jxl was never an image here
    expected = {"c.img_sdvae", "jxl.img_sdvae", "gone.img_sdvae", "preview.img_sdvae",
                "nocaption.txt_clipl", "noimage.txt_clipl"}
    assert said_orphan == expected
    assert pruned == expected


def test_a_t5_cache_of_captions_of_every_length_passes_and_a_sidecar_of_another_width_does_not(t5_cached_template,
                                                                                               tmp_path, capsys):
    """T5 sidecars hold each caption's own tokens (their counts differ, and batches pad them): only their width
    is what training holds them to."""
    import shutil

    from cachetrain import sidecar

    root = tmp_path / "data"
    shutil.copytree(t5_cached_template, root)
    texts = sorted(path for path in root.rglob(f"*{sidecar.T5_SUFFIX}") if not path.name.startswith("."))
    lengths = {sidecar.read_sidecar(path, sidecar.TEXT_EMBEDDING_KEY).shape[0] for path in texts}
    assert len(lengths) > 1  # the captions' token counts differ
    assert cache_inspect.main([str(root), "--no_progress"]) == 0
    capsys.readouterr()
    tensor, metadata = sidecar.read_sidecar_file(texts[0])
    tensor = tensor[sidecar.TEXT_EMBEDDING_KEY]
    wider = torch.zeros(tensor.shape[0], tensor.shape[1] + 8)
    write_sidecar(texts[0], {sidecar.TEXT_EMBEDDING_KEY: wider}, metadata)  # the same header, another width
    result = cache_inspect.inspect_cache([str(root)], show_progress=False)
    odd = result["suffixes"][sidecar.T5_SUFFIX]["odd_shape_files"]
    assert odd == [{"path": str(texts[0]), "shape": list(wider.shape)}]
    assert cache_inspect.main([str(root), "--no_progress"]) == 1
