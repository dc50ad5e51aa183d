"""The cache builders as users run them: freshness, legacy, orphans, shards, SDXL, summary and exit status."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import create_img_sdvae
import create_img_sdxl
from cachetrain import freshness, sidecar
from cachetrain.cache.image_cache import main as image_main
from cachetrain.cache.shares import effective_shard, parse_shard, take_shard
from cachetrain.cache.text_cache import empty_prompt_path, main_clip
from cachetrain.tiny.models import TINY_VAE, load_clip_tokenizer
from tests.conftest import CACHED_LATENT_SHAPE, CACHED_RESOLUTION

IMAGES_IN_DATASET = 48
SUMMARY_LINE = re.compile(
    r"written (?P<written>\d+) \(rebuilt stale (?P<stale>\d+)\), skipped fresh (?P<fresh>\d+), "
    r"legacy kept (?P<legacy>\d+), failed (?P<failed>\d+), skipped on request (?P<skipped>\d+)")


def summary_counts(stderr: str) -> dict[str, int]:
    """The counts of the last summary printed."""
    matches = list(SUMMARY_LINE.finditer(stderr))
    assert matches, f"no summary in output:\n{stderr}"
    return {k: int(v) for k, v in matches[-1].groupdict().items()}


def run_images(capsys, model, root, *extra, defaults=create_img_sdvae.DEFAULTS) -> tuple[int, dict[str, int], str]:
    capsys.readouterr()
    status = image_main(["--model", str(model), "--data_root", str(root), "--resolution", str(CACHED_RESOLUTION),
                         "--num_workers", "0", "--no_progress", "--save_dtype", "float32", *extra], defaults)
    err = capsys.readouterr().err
    return status, summary_counts(err) if status != 2 else {}, err


def run_captions(capsys, model, root, *extra) -> tuple[int, dict[str, int], str]:
    capsys.readouterr()
    status = main_clip(["--model", str(model), "--data_root", str(root), "--no_progress", "--save_dtype", "float32",
                        *extra])
    err = capsys.readouterr().err
    return status, summary_counts(err), err


def sidecars(root: Path, suffix: str) -> list[Path]:
    """The samples' sidecars (not the hidden empty-prompt one)."""
    return sorted(p for p in root.rglob(f"*{suffix}") if not p.name.startswith("."))


def write_vae_folder(folder: Path, seed: int, **config) -> Path:
    """A folder holding only vae/: enough for the image scripts' --model or --custom."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**{**TINY_VAE, **config}).save_pretrained(folder / "vae")
    return folder


@pytest.fixture(scope="module")
def sdxl_shaped_vae(tmp_path_factory) -> Path:
    """A tiny VAE configured as the SDXL one is (force_upcast, scaling factor 0.13025), inside a pipeline folder."""
    return write_vae_folder(tmp_path_factory.mktemp("sdxl-pipeline"), seed=0, force_upcast=True,
                            scaling_factor=0.13025)


def test_a_rerun_skips_every_fresh_sidecar_and_exits_zero(capsys, tiny_sd_model, cached_dataset):
    before = {p: p.stat().st_mtime_ns for p in sidecars(cached_dataset, ".img_sdvae")}
    status, counts, err = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0
    assert counts == dict(written=0, stale=0, fresh=IMAGES_IN_DATASET, legacy=0, failed=0, skipped=0)
    assert {p: p.stat().st_mtime_ns for p in sidecars(cached_dataset, ".img_sdvae")} == before
    assert re.search(r"elapsed \d+\.\d s; [\d.]+ files/s", err)


def test_changing_an_image_a_caption_or_the_vae_makes_exactly_those_stale(capsys, tiny_sd_model, cached_dataset,
                                                                          tmp_path):
    image = cached_dataset / "part1" / "img00005.jpg"
    Image.new("RGB", (80, 72), (200, 30, 30)).save(image, quality=90)
    caption = cached_dataset / "part2" / "img00006.txt"
    caption.write_text("a green cross on a red background", encoding="utf-8")
    untouched = cached_dataset / "part0" / "img00000.img_sdvae"
    untouched_bytes = untouched.read_bytes()

    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["written"] == 1 and counts["stale"] == 1
    assert counts["fresh"] == IMAGES_IN_DATASET - 1
    assert sidecar.read_metadata(image.with_suffix(".img_sdvae"))["source_mtime_ns"] == str(image.stat().st_mtime_ns)
    assert untouched.read_bytes() == untouched_bytes

    status, counts, _ = run_captions(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["written"] == 1 and counts["stale"] == 1
    assert counts["fresh"] == IMAGES_IN_DATASET - 1

    other_vae = write_vae_folder(tmp_path / "retrained", seed=7)
    status, counts, _ = run_images(capsys, other_vae, cached_dataset)
    assert status == 0 and counts["written"] == counts["stale"] == IMAGES_IN_DATASET and counts["fresh"] == 0


def test_a_copy_that_did_not_keep_modification_times_keeps_its_sidecars(capsys, tiny_sd_model, cached_dataset,
                                                                        tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(cached_dataset, copy, copy_function=shutil.copyfile)  # new times, as cp without -p
    latents = {p: p.read_bytes() for p in sidecars(cached_dataset, ".img_sdvae")}

    status, counts, err = run_images(capsys, tiny_sd_model, copy)
    assert status == 0 and counts["written"] == 0 and counts["fresh"] == IMAGES_IN_DATASET
    assert f"fresh by content {IMAGES_IN_DATASET}: new modification time, same bytes" in err
    for original, cached in latents.items():
        copied = copy / original.relative_to(cached_dataset)
        assert sidecar.read_sidecar(copied, "latent").equal(sidecar.read_sidecar(original, "latent"))
        image = copied.with_suffix(".jpg")
        assert sidecar.read_metadata(copied)["source_mtime_ns"] == str(image.stat().st_mtime_ns)

    status, counts, err = run_images(capsys, tiny_sd_model, copy)  # the new times are stored: a stat suffices
    assert counts["fresh"] == IMAGES_IN_DATASET and "fresh by content" not in err


def test_a_sidecar_fresh_by_content_stays_fresh_when_its_new_time_cannot_be_stored(capsys, tiny_sd_model,
                                                                                   cached_dataset, tmp_path,
                                                                                   monkeypatch):
    from cachetrain.cache import plan as cache_plan

    def read_only(path, changes):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(cache_plan, "update_metadata", read_only)
    copy = tmp_path / "copied"
    shutil.copytree(cached_dataset, copy, copy_function=shutil.copyfile)
    status, counts, err = run_images(capsys, tiny_sd_model, copy, "--report", str(tmp_path / "report.jsonl"))
    assert status == 0 and counts["written"] == 0 and counts["fresh"] == IMAGES_IN_DATASET
    assert f"{IMAGES_IN_DATASET} could not store it and will be read again next run" in err
    notes = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert len(notes) == IMAGES_IN_DATASET
    assert {(n["status"], n["kind"]) for n in notes} == {("note", "modification time not stored")}
    assert "Read-only file system" in notes[0]["reason"]


def test_sd15_and_sdxl_vaes_are_never_mistaken_for_each_other(capsys, tiny_sd_model, cached_dataset,
                                                              sdxl_shaped_vae):
    # Same weights, same class: only the SDXL config (scaling factor, force_upcast) differs.
    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset, "--custom", str(sdxl_shaped_vae),
                                   "--out_suffix", ".img_sdvae")
    assert status == 0 and counts["stale"] == IMAGES_IN_DATASET and counts["fresh"] == 0
    sd15 = sidecar.read_metadata(cached_dataset / "part0" / "img00000.img_sdvae")
    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset)
    assert counts["stale"] == IMAGES_IN_DATASET
    assert sidecar.read_metadata(cached_dataset / "part0" / "img00000.img_sdvae") != sd15


def test_create_img_sdxl_takes_the_vae_of_a_custom_pipeline_and_writes_img_sdxl(capsys, shapes_dataset,
                                                                               sdxl_shaped_vae):
    assert create_img_sdxl.DEFAULTS.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert create_img_sdxl.DEFAULTS.out_suffix == ".img_sdxl" == sidecar.SDXL_VAE_SUFFIX
    status, counts, _ = run_images(capsys, "no/such-hub-model", shapes_dataset, "--custom", str(sdxl_shaped_vae),
                                   defaults=create_img_sdxl.DEFAULTS)
    assert status == 0 and counts["written"] == IMAGES_IN_DATASET
    written = sidecars(shapes_dataset, ".img_sdxl")
    assert len(written) == IMAGES_IN_DATASET and not sidecars(shapes_dataset, ".img_sdvae")
    assert sidecar.read_sidecar(written[0], "latent", ndim=3).shape == CACHED_LATENT_SHAPE
    assert sidecar.read_metadata(written[0])["encoder"] == os.path.abspath(sdxl_shaped_vae)


def test_the_sdxl_vae_is_refused_in_float16_with_a_clear_message(capsys, shapes_dataset, sdxl_shaped_vae):
    status, _, err = run_images(capsys, "unused", shapes_dataset, "--custom", str(sdxl_shaped_vae),
                                "--dtype", "float16", defaults=create_img_sdxl.DEFAULTS)
    assert status == 2
    assert "overflows in float16" in err and "--dtype bfloat16" in err
    assert not sidecars(shapes_dataset, ".img_sdxl")


def test_legacy_sidecars_are_kept_unless_overwrite(capsys, tiny_sd_model, cached_dataset):
    legacy = cached_dataset / "part3" / "img00003.img_sdvae"
    save_file({"latent": torch.full(CACHED_LATENT_SHAPE, 7.0)}, legacy)  # as the original scripts wrote them
    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["legacy"] == 1 and counts["written"] == 0
    assert torch.equal(sidecar.read_sidecar(legacy, "latent"), torch.full(CACHED_LATENT_SHAPE, 7.0))

    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset, "--overwrite")
    assert status == 0 and counts["written"] == IMAGES_IN_DATASET and counts["legacy"] == 0
    assert sidecar.read_metadata(legacy)["kind"] == "image_latent"


def test_unreadable_and_truncated_sidecars_are_rebuilt(capsys, tiny_sd_model, cached_dataset):
    garbage = cached_dataset / "part0" / "img00004.img_sdvae"
    garbage.write_bytes(b"not a safetensors file")
    truncated = cached_dataset / "part1" / "img00001.img_sdvae"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["written"] == counts["stale"] == 2
    for path in (garbage, truncated):
        assert sidecar.read_sidecar(path, "latent", ndim=3).shape == CACHED_LATENT_SHAPE


def test_orphan_sidecars_are_reported_and_removed_only_with_prune(capsys, tiny_sd_model, cached_dataset):
    (cached_dataset / "part0" / "img00000.jpg").unlink()
    orphan = cached_dataset / "part0" / "img00000.img_sdvae"
    status, counts, err = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["fresh"] == IMAGES_IN_DATASET - 1
    assert f"orphan sidecar (source gone): {orphan}" in err and "orphan sidecars (source gone) 1" in err
    assert orphan.exists()
    run_images(capsys, tiny_sd_model, cached_dataset, "--prune")
    assert not orphan.exists()
    assert len(sidecars(cached_dataset, ".img_sdvae")) == IMAGES_IN_DATASET - 1


def test_a_deleted_caption_is_reported_its_old_embedding_is_an_orphan_and_the_latent_stays(
        capsys, tiny_sd_model, cached_dataset, tmp_path):
    (cached_dataset / "part1" / "img00009.txt").unlink()
    old_embedding = cached_dataset / "part1" / "img00009.txt_clipl"
    report = tmp_path / "report.jsonl"
    status, counts, err = run_captions(capsys, tiny_sd_model, cached_dataset, "--report", str(report), "--prune")
    assert status == 1 and counts["failed"] == 1 and counts["fresh"] == IMAGES_IN_DATASET - 1
    assert "no caption file img00009.txt" in err
    assert not old_embedding.exists()
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert lines == [{"path": str(cached_dataset / "part1" / "img00009.jpg"), "status": "failed",
                      "kind": "no caption", "reason": "no caption file img00009.txt"},
                     {"path": str(old_embedding), "status": "orphan", "kind": "source gone",
                      "reason": "removed (--prune)"}]
    status, counts, _ = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["fresh"] == IMAGES_IN_DATASET


def test_each_data_root_gets_the_empty_prompt_embedding_once(capsys, tiny_sd_model, cached_dataset):
    from cachetrain.models.loading import load_clip_text_encoder
    from cachetrain.models.text_encoding import encode_clip_prompts

    path = Path(empty_prompt_path(str(cached_dataset), ".txt_clipl"))
    assert path == cached_dataset / ".empty_prompt.txt_clipl"
    tokenizer, text_encoder = load_clip_text_encoder(str(tiny_sd_model))
    expected = encode_clip_prompts(tokenizer, text_encoder, [""])[0]
    assert torch.allclose(sidecar.read_sidecar(path, "emb", ndim=2), expected, atol=1e-6)
    assert sidecar.read_metadata(path)["caption_sha256"] == freshness.caption_source_identity("")["caption_sha256"]
    written_at = path.stat().st_mtime_ns
    run_captions(capsys, tiny_sd_model, cached_dataset)
    assert path.stat().st_mtime_ns == written_at  # fresh: not rewritten


def test_two_shards_cover_every_file_exactly_once(capsys, tiny_sd_model, shapes_dataset):
    written = []
    for shard in ("0/2", "1/2"):
        status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--shard", shard)
        assert status == 0 and counts["fresh"] == 0
        written.append(counts["written"])
    assert written == [IMAGES_IN_DATASET // 2, IMAGES_IN_DATASET // 2]
    assert len(sidecars(shapes_dataset, ".img_sdvae")) == IMAGES_IN_DATASET
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset)
    assert counts["fresh"] == IMAGES_IN_DATASET and counts["written"] == 0


def test_shards_of_machines_times_processes_are_disjoint_and_cover_everything():
    files = [f"f{i}" for i in range(101)]
    taken = []
    for machine in range(3):
        for rank in range(4):
            index, count = effective_shard((machine, 3), process=(rank, 4))
            taken.extend(take_shard(files, index, count))
    assert sorted(taken) == sorted(files)
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) == (0, 1)
    for bad in ("5/5", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_under_torchrun_each_rank_takes_its_part_of_the_machine_share(capsys, monkeypatch, tiny_sd_model,
                                                                       shapes_dataset):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--shard", "1/2")
        assert status == 0 and counts["written"] == IMAGES_IN_DATASET // 4
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset)
    assert counts["fresh"] == IMAGES_IN_DATASET // 2 and counts["written"] == IMAGES_IN_DATASET // 2


def test_worker_decode_gives_the_same_latents_as_in_process_decode(capsys, tiny_sd_model, shapes_dataset, tmp_path):
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--num_workers", "2", "--batch_size", "5")
    assert status == 0 and counts["written"] == IMAGES_IN_DATASET
    in_workers = {p: sidecar.read_sidecar(p, "latent") for p in sidecars(shapes_dataset, ".img_sdvae")}
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--overwrite")
    assert counts["written"] == IMAGES_IN_DATASET
    for path, latent in in_workers.items():
        assert torch.equal(sidecar.read_sidecar(path, "latent"), latent), path


def test_non_finite_text_embeddings_are_not_written(capsys, tiny_sd_model, shapes_dataset, tmp_path):
    from transformers import CLIPTextModel

    # One token's embedding is NaN: exactly the captions that use the word get a NaN embedding.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_sd_model, poisoned)
    encoder = CLIPTextModel.from_pretrained(poisoned / "text_encoder")
    tokenizer = load_clip_tokenizer(poisoned / "tokenizer")
    purple = tokenizer.convert_tokens_to_ids("purple</w>")
    with torch.no_grad():
        encoder.get_input_embeddings().weight[purple] = float("nan")
    encoder.save_pretrained(poisoned / "text_encoder")
    with_purple = [p for p in shapes_dataset.rglob("*.txt") if "purple" in p.read_text()]
    assert 0 < len(with_purple) < IMAGES_IN_DATASET

    status, counts, err = run_captions(capsys, poisoned, shapes_dataset)
    assert status == 1
    assert counts["failed"] == len(with_purple) and counts["written"] == IMAGES_IN_DATASET - len(with_purple)
    assert f"non-finite output {len(with_purple)}" in err
    assert not any(p.with_suffix(".txt_clipl").exists() for p in with_purple)


def test_sidecars_of_images_left_out_by_extensions_are_not_orphans(capsys, tiny_sd_model, cached_dataset):
    png = cached_dataset / "part0" / "img00000.png"
    (cached_dataset / "part0" / "img00000.jpg").rename(png)
    status, counts, err = run_images(capsys, tiny_sd_model, cached_dataset, "--extensions", "JPG", "--prune")
    assert status == 0 and counts["fresh"] == IMAGES_IN_DATASET - 1
    assert "orphan" not in err
    assert png.with_suffix(".img_sdvae").exists()


def test_every_run_removes_temporaries_of_killed_writers_but_not_of_live_ones_nor_user_files(capsys, tiny_sd_model,
                                                                                              cached_dataset):
    folder = cached_dataset / "part2"
    start_of_a_sidecar = (folder / "img00002.img_sdvae").read_bytes()[:100]
    ours = folder / ".img00002.img_sdvae.partial-dead0001"
    safetensors_own = folder / ".tmpQ3xZ9a"  # as safetensors' save_file names its temporary
    live = folder / ".img00006.img_sdvae.partial-0123abcd"
    users = folder / ".tmpNotes1"  # a user's hidden file under a temporary-like name
    for path in (ours, safetensors_own, live):
        path.write_bytes(start_of_a_sidecar)
    users.write_text("not a sidecar")
    for path in (ours, safetensors_own, users):
        old = path.stat().st_mtime - 3600
        os.utime(path, (old, old))
    status, counts, err = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["fresh"] == IMAGES_IN_DATASET
    assert "leftover temporaries of killed writers 2, removed 2" in err
    assert not ours.exists() and not safetensors_own.exists()
    assert live.exists() and users.read_text() == "not a sidecar"


def test_a_report_file_describes_one_run(capsys, tiny_sd_model, cached_dataset, tmp_path):
    report = tmp_path / "report.jsonl"
    report.write_text('{"path": "from an earlier run"}\n')
    status, _, _ = run_images(capsys, tiny_sd_model, cached_dataset, "--report", str(report))
    assert status == 0 and report.read_text() == ""


def test_non_finite_latents_are_not_written(capsys, shapes_dataset, tmp_path):
    from diffusers import AutoencoderKL

    broken = write_vae_folder(tmp_path / "broken", seed=0)
    vae = AutoencoderKL.from_pretrained(broken / "vae")
    with torch.no_grad():
        vae.quant_conv.bias[0] = float("inf")  # channel 0 of every latent becomes Inf
    vae.save_pretrained(broken / "vae")
    status, counts, err = run_images(capsys, broken, shapes_dataset)
    assert status == 1
    assert counts["written"] == 0 and counts["failed"] == IMAGES_IN_DATASET
    assert f"problems: non-finite output {IMAGES_IN_DATASET}" in err
    assert "the VAE produced NaN/Inf for this image; nothing written" in err
    assert not sidecars(shapes_dataset, ".img_sdvae")


def test_the_summary_shows_the_first_few_failures_and_counts_the_rest(tmp_path, capsys):
    from cachetrain.cache.summary import FAILURES_SHOWN, CacheSummary

    report = tmp_path / "report.jsonl"
    summary = CacheSummary(report_path=str(report))
    summary.count("written", 3)
    for i in range(FAILURES_SHOWN + 3):
        summary.fail(f"/data/bad{i}.jpg", "not an image", "Pillow does not recognise the file's content")
    summary.fail("/data/small.jpg", "too small", "40x40 is under --min_size 48")
    text = summary.render()
    assert summary.exit_status() == 1
    assert "written 3 (rebuilt stale 0), skipped fresh 0, legacy kept 0, failed 8, skipped on request 1" in text
    assert "problems: not an image 8, too small 1" in text
    shown = [line for line in text.splitlines() if line.startswith("  failed: ")]
    assert shown[0] == "  failed: /data/bad0.jpg: not an image: Pillow does not recognise the file's content"
    assert len(shown) == FAILURES_SHOWN
    assert f"  ... and 3 more failures (all in {report})" in text
    assert len(report.read_text().splitlines()) == FAILURES_SHOWN + 4


def test_another_text_encoder_plugs_in_by_overriding_embed_and_may_store_trimmed_embeddings(capsys, tiny_sd_model,
                                                                                         shapes_dataset):
    from cachetrain.models.loading import load_clip_text_encoder
    from cachetrain.cache.text_cache import TextEmbeddingBuilder, build_parser, run_text_cache, text_cache_settings
    from cachetrain.models.text_encoding import encode_clip_prompts

    class TrimmedBuilder(TextEmbeddingBuilder):
        """Keeps only the real tokens of each caption (as a T5 cache may)."""

        def settings_metadata(self):
            return {**super().settings_metadata(), "trimmed": "true"}

        def embed(self, prompts):
            full = encode_clip_prompts(self.tokenizer, self.text_encoder, prompts)
            lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
            return [emb[:n] for emb, n in zip(full, lengths)]

    args = build_parser(str(tiny_sd_model), ".txt_trimmed", "test").parse_args(
        ["--data_root", str(shapes_dataset), "--no_progress", "--save_dtype", "float32"])
    tokenizer, encoder = load_clip_text_encoder(str(tiny_sd_model))
    builder = TrimmedBuilder(tokenizer=tokenizer, text_encoder=encoder, model_name="tiny", device=torch.device("cpu"),
                             dtype=torch.float32, save_dtype=torch.float32, batch_size=7)
    assert run_text_cache(builder, args, text_cache_settings(args)) == 0
    caption = (shapes_dataset / "part0" / "img00000.txt").read_text().strip()
    emb = sidecar.read_sidecar(shapes_dataset / "part0" / "img00000.txt_trimmed", "emb", ndim=2)
    assert emb.shape == (len(tokenizer(caption).input_ids), 32)
    assert sidecar.read_metadata(shapes_dataset / "part0" / "img00000.txt_trimmed")["trimmed"] == "true"
    assert sidecar.read_sidecar(shapes_dataset / ".empty_prompt.txt_trimmed", "emb").shape == (2, 32)
    assert len(sidecars(shapes_dataset, ".txt_trimmed")) == IMAGES_IN_DATASET
    capsys.readouterr()
    assert run_text_cache(builder, args, text_cache_settings(args)) == 0
    assert summary_counts(capsys.readouterr().err)["fresh"] == IMAGES_IN_DATASET


def test_captions_cannot_be_taken_for_images(capsys, tiny_sd_model, shapes_dataset):
    status, _, err = run_images(capsys, tiny_sd_model, shapes_dataset, "--extensions", "jpg", "TXT")
    assert status == 2 and "--extensions .txt: captions and sidecars cannot be sources" in err
    assert not sidecars(shapes_dataset, ".img_sdvae")


def test_only_vaes_that_must_be_upcast_are_refused_in_float16():
    from cachetrain.cache.image_cache import check_vae_precision

    sdxl_like, sd15_like = {"force_upcast": True}, {"force_upcast": False}
    with pytest.raises(ValueError, match="overflows in float16"):
        check_vae_precision(sdxl_like, torch.float16)
    for dtype in (torch.bfloat16, torch.float32):
        check_vae_precision(sdxl_like, dtype)
    check_vae_precision(sd15_like, torch.float16)
