"""A regular file whose read never returns (one file of a real FUSE mount, served by tests/stalling_fs.py):
the trainer and the cache scripts name it ("did not answer within N s"), pass it over as a bad file, and
finish; a stuck read holds up neither the run nor the end of the process (nor the loader's worker processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cachetrain import bounded_read, sidecar

from tests.conftest import REPO_ROOT
from tests.stalling_fs import fuse_unavailable_reason, stalling_mount

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
needs_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason()))


def _run(*command: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """The command's result; a hang fails the test, and leaves the process to be killed once the mount is down
    (a process whose read the kernel holds cannot be killed before: subprocess.run would wait for it forever)."""
    process = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _LEFT_RUNNING.append(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


_LEFT_RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_hung_processes():
    yield
    while _LEFT_RUNNING:  # the mount is down by now: its reads failed, so the process can be ended
        process = _LEFT_RUNNING.pop()
        process.kill()
        process.communicate(timeout=60)


def test_a_read_past_its_bound_is_named_and_the_next_read_runs_on_a_fresh_worker(tmp_path):
    stuck = threading.Event()
    with pytest.raises(bounded_read.ReadTimedOut, match=r"x\.img_sdvae: did not answer within 0\.2 s"):
        bounded_read.call_bounded(tmp_path / "x.img_sdvae", stuck.wait, timeout=0.2)
    assert bounded_read.call_bounded("y.img_sdvae", lambda: "read", timeout=5) == "read"
    with pytest.raises(ZeroDivisionError):  # what the read raises is raised to the caller
        bounded_read.call_bounded("z.img_sdvae", lambda: 1 / 0, timeout=5)
    stuck.set()


@needs_fuse
def test_a_process_with_a_read_stuck_on_a_hung_mount_names_it_and_still_exits(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "stuck.bin").write_bytes(b"never served")
    (source / "fine.bin").write_bytes(b"served")
    reader = ("import sys; from cachetrain import bounded_read\n"
              "try:\n    bounded_read.read_file_bytes(sys.argv[1], timeout=1)\n"
              "except bounded_read.ReadTimedOut as error:\n    print(error)\n"
              "print(bounded_read.read_file_bytes(sys.argv[2], timeout=1).decode())\n")
    with stalling_mount(source, tmp_path / "mount", ["stuck.bin"]) as mount:
        started = time.monotonic()
        done = _run("-c", reader, str(mount / "stuck.bin"), str(mount / "fine.bin"), timeout=60)
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{mount / 'stuck.bin'}: did not answer within 1 s", "served"]
    assert took < 30  # exited with its reader thread still stuck in the read (the mount was still up)


@needs_fuse
def test_the_trainer_skips_a_sidecar_that_never_answers_naming_it_and_finishes(cached_dataset, tiny_sd_model,
                                                                               tmp_path):
    latent = sorted(cached_dataset.rglob("*.img_sdvae"))[5]
    with stalling_mount(cached_dataset, tmp_path / "mount", [latent.name]) as mount:
        stuck = mount / latent.relative_to(cached_dataset)
        output = tmp_path / "run"
        done = _run(str(REPO_ROOT / "train_from_cached.py"), "--pretrained_model", str(tiny_sd_model),
                    "--train_data_dir", str(mount), "--output_dir", str(output), "--num_workers", "1",
                    "--no_progress", "--batch_size", "4", "--max_steps", "13", "--save_steps", "0",
                    "--read_timeout", "2")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[train] skipped {stuck}: did not answer within 2 s" in done.stderr  # in a loader worker process
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["bad_files"] == {str(stuck): "did not answer within 2 s"}
    assert summary["skipped_samples"] >= 1 and summary["exit_status"] == 0
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@needs_fuse
def test_the_image_cache_script_names_an_image_that_never_answers_and_caches_the_rest(shapes_dataset,
                                                                                      tiny_sd_model, tmp_path):
    images = sorted(shapes_dataset.rglob("*.jpg"))
    stuck_image = images[3]
    with stalling_mount(shapes_dataset, tmp_path / "mount", [stuck_image.name]) as mount:
        stuck = mount / stuck_image.relative_to(shapes_dataset)
        done = _run(str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model), "--data_root",
                    str(mount), "--resolution", "64", "--num_workers", "1", "--no_progress", "--read_timeout", "2")
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, done.stderr[-3000:]  # one input has no sidecar
    assert f"[cache] failed {stuck}: no answer: did not answer within 2 s" in done.stderr
    written = {path.with_suffix(".jpg") for path in shapes_dataset.rglob("*.img_sdvae")}
    assert written == set(images) - {stuck_image}
    for path in shapes_dataset.rglob("*.img_sdvae"):
        assert sidecar.read_sidecar(path, "latent", ndim=3).shape[0] == 4


INDEX_PROBE = r"""
import json, sys
from cachetrain import bounded_read
from cachetrain.data_index import refresh
bounded_read.set_read_timeout(2)
first = refresh(sys.argv[1], index_dir=sys.argv[2])
second = refresh(sys.argv[1], index_dir=sys.argv[2])
print(json.dumps({"first": first.scanned, "second": second.scanned, "written": first.written_to is not None}))
"""


@needs_fuse
def test_a_header_read_that_times_out_leaves_its_folder_to_be_read_again_not_believed(cached_dataset, tmp_path):
    """The data index never keeps "unreadable" for a file that only did not answer: the folder holding it is
    scanned again at the next refresh, the others come from the index."""
    stalled = sorted(cached_dataset.rglob("*.img_sdvae"))[7]
    folder = stalled.parent.relative_to(cached_dataset).as_posix()
    an_hour_ago = time.time() - 3600  # older than the index's racy window: a folder is believed by its mtime
    for path in [cached_dataset, *(p for p in cached_dataset.rglob("*") if p.is_dir())]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    with stalling_mount(cached_dataset, tmp_path / "mount", [stalled.name]) as mount:
        done = _run("-c", INDEX_PROBE, str(mount), str(tmp_path / "index"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["written"] and folder in result["first"] and len(result["first"]) > 1
    assert result["second"] == [folder]


FOLDER_PROBE = r"""
import json, sys
from cachetrain import bounded_read
from cachetrain.data_index import folder_stems, refresh
bounded_read.set_read_timeout(float(sys.argv[3]))
first = refresh(sys.argv[1], index_dir=sys.argv[2])
table = first.table
number = table.folders().index(sys.argv[4])
records = {}
for stem, row in folder_stems(table, *table.folder_rows(number)).items():
    for column, suffix in enumerate(table.suffixes):
        dims = int(table.header_ndims[row, column])
        if dims != -1:  # ABSENT
            records[stem + suffix] = [dims, table.header_shapes[row, column, :max(dims, 0)].tolist()]
second = refresh(sys.argv[1], index_dir=sys.argv[2])
print(json.dumps({"seconds": first.seconds, "records": records, "folder_mtime": int(table.folder_mtime_ns[number]),
                  "second": second.scanned}))
"""


@needs_fuse
def test_a_stalled_sidecar_costs_its_folder_one_read_bound_and_the_folders_other_sidecars_are_indexed(
        cached_dataset, tmp_path):
    """The index reads a folder's headers in one hand-over to a bounded worker: the first sidecar of a folder
    never answers, the reads queued behind it go on on a fresh worker, and the whole refresh takes about one read
    bound, not one per file."""
    from cachetrain.data_index import UNREADABLE, UNVERIFIED_MTIME

    folder = sorted(path for path in cached_dataset.iterdir() if path.is_dir() and not path.name.startswith("."))[1]
    sidecars = sorted(path for path in folder.iterdir() if path.suffix in (".img_sdvae", ".txt_clipl"))
    stalled = sidecars[0]  # read first: every other sidecar of the folder waits behind it
    expected = {}
    for path in sidecars[1:]:
        shape = next(entry["shape"] for key, entry in sidecar.read_header(path).items() if key != "__metadata__")
        expected[path.name] = [len(shape), shape[:3]]
    an_hour_ago = time.time() - 3600  # older than the index's racy window: a folder is believed by its mtime
    for path in [cached_dataset, *(p for p in cached_dataset.rglob("*") if p.is_dir())]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    bound = 2
    with stalling_mount(cached_dataset, tmp_path / "mount", [stalled.name]) as mount:
        done = _run("-c", FOLDER_PROBE, str(mount), str(tmp_path / "index"), str(bound), folder.name, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert len(sidecars) >= 20 and result["records"] == {**expected, stalled.name: [UNREADABLE, []]}
    assert result["folder_mtime"] == UNVERIFIED_MTIME  # no verdict on the stalled file: read again next time
    assert result["second"] == [folder.name]
    assert result["seconds"] < bound * len(sidecars) / 2  # one bound for the folder, not one per sidecar behind it
