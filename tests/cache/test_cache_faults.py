"""Cache scripts meet a read-only data root, a full disk or a failing write: each is a counted, named problem
in the summary, the exit status is 1, what was written stays, and there is never a traceback.

Read-only and full disks are real: a tmpfs mounted read-only, and a tmpfs filled to its last pages. Both
need root (and a kernel that lets this process mount); elsewhere these tests are skipped.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess

import torch

from cachetrain import sidecar
from cachetrain.cache.summary import CacheSummary
from cachetrain.cache.writer import BackgroundWriter, EncodedItem

from tests.script_runs import run_script
from tests.small_disks import fill, make_read_only, tmpfs
from .test_cache_builders import summary_counts

IMAGES = 48


def run_cache_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_script(script, *args, "--no_progress")


def not_attempted(stderr: str) -> int:
    """The files a run that stopped early left for the next one (0 when it did not stop)."""
    match = re.search(r"^stopped early: .*; (\d+) files not attempted", stderr, re.M)
    return int(match.group(1)) if match else 0


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def test_a_read_only_data_root_is_a_counted_problem_for_both_cache_scripts_not_a_traceback(tmp_path, tiny_sd_model,
                                                                                             shapes_dataset):
    with tmpfs(tmp_path / "ro", "16m") as root:
        shutil.copytree(shapes_dataset, root / "data")
        make_read_only(root)
        data = str(root / "data")

        images = run_cache_script("create_img_sdvae.py", "--model", str(tiny_sd_model), "--data_root", data,
                            "--resolution", "64", "--num_workers", "0")
        assert_no_traceback(images)
        assert images.returncode == 1, images.stderr
        assert f"written 0 (rebuilt stale 0), skipped fresh 0, legacy kept 0, failed {IMAGES}" in images.stderr
        assert f"problems: read-only {IMAGES}" in images.stderr
        assert "could not write img00000.img_sdvae: [Errno 30] Read-only file system" in images.stderr

        # create_clipl.py also writes the root's empty prompt: one more failure, named, after the captions'
        captions = run_cache_script("create_clipl.py", "--model", str(tiny_sd_model), "--data_root", data)
        assert_no_traceback(captions)
        assert captions.returncode == 1, captions.stderr
        assert f"failed {IMAGES + 1}," in captions.stderr
        assert f"problems: read-only {IMAGES + 1}" in captions.stderr
        assert f"failed {data}/.empty_prompt.txt_clipl: read-only: could not write .empty_prompt.txt_clipl" \
            in captions.stderr
        assert not list((root / "data").rglob("*.txt_clipl"))


def test_a_full_disk_is_counted_the_written_sidecars_stay_and_no_temporary_is_left(tmp_path, tiny_sd_model,
                                                                                   shapes_dataset):
    with tmpfs(tmp_path / "small", "2m") as disk:
        shutil.copytree(shapes_dataset, disk / "data")
        fill(disk, leave_pages=5)  # room for a few sidecars
        result = run_cache_script("create_img_sdvae.py", "--model", str(tiny_sd_model), "--data_root", str(disk / "data"),
                            "--resolution", "64", "--num_workers", "0", "--batch_size", "4")
        assert_no_traceback(result)
        assert result.returncode == 1, result.stderr
        written = sorted((disk / "data").rglob("*.img_sdvae"))
        assert 0 < len(written) < IMAGES
        counts = summary_counts(result.stderr)
        failed = counts["failed"]
        assert counts["written"] == len(written) and f"problems: disk full {failed}\n" in result.stderr
        # after DISK_FULL_STOP failures in a row the run stops encoding; the rest is counted, not lost
        assert len(written) + failed + not_attempted(result.stderr) == IMAGES
        assert "[Errno 28] No space left on device" in result.stderr
        for path in written:  # what was written is whole
            assert sidecar.read_sidecar(path, "latent", ndim=3).shape == (4, 16, 16)
        assert not [p for p in (disk / "data").rglob("*") if sidecar.is_temporary(p.name)]


def test_an_error_of_safetensors_itself_is_a_counted_write_failure(tmp_path):
    summary = CacheSummary()
    writer = BackgroundWriter(summary)
    good = EncodedItem("good.jpg", {"latent": torch.zeros(4, 2, 2)}, {})
    # safetensors refuses a sparse tensor with its own ValueError
    bad = EncodedItem("bad.jpg", {"latent": torch.zeros(4, 2, 2).to_sparse()}, {})
    writer.submit(str(tmp_path / "good.img_sdvae"), good)
    writer.submit(str(tmp_path / "bad.img_sdvae"), bad)
    writer.close()
    assert summary.counts["written"] == 1 and summary.counts["failed"] == 1
    assert summary.failure_kinds == {"write failed": 1}
    assert summary.failures[0][0] == "bad.jpg" and "could not write bad.img_sdvae" in summary.failures[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.img_sdvae"]


def test_an_unwritable_report_file_is_refused_at_the_start(tmp_path, tiny_sd_model, shapes_dataset):
    result = run_cache_script("create_img_sdvae.py", "--model", str(tiny_sd_model), "--data_root", str(shapes_dataset),
                        "--report", str(tmp_path / "no" / "such" / "report.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --report {tmp_path}/no/such/report.jsonl: "
                                                             "cannot write it")


def test_write_problems_are_named_by_their_cause():
    from cachetrain.cache.summary import write_problem_kind

    assert write_problem_kind(OSError(errno.ENOSPC, "full")) == "disk full"
    assert write_problem_kind(OSError(errno.EROFS, "ro")) == "read-only"
    assert write_problem_kind(PermissionError(errno.EACCES, "no")) == "permission denied"
    assert write_problem_kind(ValueError("sparse")) == "write failed"


def test_a_run_that_keeps_meeting_a_full_disk_stops_encoding_and_says_how_many_files_are_left(
        tmp_path, tiny_sd_model, shapes_dataset, capsys, monkeypatch):
    from cachetrain.cache import writer as cache_writer
    from cachetrain.cache.image_cache import main as image_main
    import create_img_sdvae

    monkeypatch.setattr(cache_writer, "DISK_FULL_STOP", 4)  # the real threshold (32) needs a larger dataset
    with tmpfs(tmp_path / "small", "2m") as disk:
        shutil.copytree(shapes_dataset, disk / "data")
        fill(disk, leave_pages=0)
        capsys.readouterr()
        status = image_main(["--model", str(tiny_sd_model), "--data_root", str(disk / "data"), "--resolution", "64",
                             "--num_workers", "0", "--batch_size", "1", "--no_progress"], create_img_sdvae.DEFAULTS)
        err = capsys.readouterr().err
    assert status == 1
    assert len([line for line in err.splitlines() if line.startswith("stopped early: the disk is full")]) == 1, err
    counts = summary_counts(err)
    assert not_attempted(err) > 0 and counts["failed"] >= 4
    assert counts["written"] + counts["failed"] + not_attempted(err) == IMAGES
