"""Training from shards in object storage: a real S3-compatible server (moto's) on 127.0.0.1, shards
uploaded with boto3, the trainer reading s3:// through pyarrow; stop and resume, a server that goes
away mid-run, credentials refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cachetrain.commands import pack
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import main, train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "cachetrain-shards"


@pytest.fixture
def s3_env(monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    return monkeypatch


def _start_server(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return server, endpoint


def _upload(folder: Path, endpoint: str, prefix: str = "sd15/shards") -> str:
    client = boto3.client("s3", endpoint_url=endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _unet_weights(a), _unet_weights(b)
    return all(torch.equal(wa[name], wb[name]) for name in wa)


def _shards(cached_dataset: Path, tmp_path: Path) -> Path:
    assert pack([str(cached_dataset), "--out", str(tmp_path / "shards"), "--pairs_per_shard", "4"]) == 0
    return tmp_path / "shards"


@pytest.mark.slow
def test_a_run_from_s3_stopped_and_resumed_ends_with_the_weights_of_a_local_run_and_keeps_its_cache_capped(
        tiny_sd_model, cached_dataset, tmp_path, s3_env):
    shards = _shards(cached_dataset, tmp_path)
    server, endpoint = _start_server(s3_env)
    try:
        url = _upload(shards, endpoint)
        sizes = sorted(shard["bytes"] for shard in json.loads((shards / "shards.json").read_text())["shards"])
        cap_gb = (sizes[-1] + sizes[-2]) / 1e9  # room for two shards: the rest are fetched again when needed
        common = ("--batch_size", "4", "--max_steps", "8", "--log_every", "1")
        streamed = ("--shard_cache_dir", str(tmp_path / "cache"), "--shard_cache_gb", f"{cap_gb:.9f}")
        local = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "local", *common)))
        stopped = train(parse_train_args(_args(tiny_sd_model, url, tmp_path / "s3", *common, *streamed)),
                        interrupt_after_batches=3)
        assert stopped.interrupted and stopped.steps == 3
        resumed = train(parse_train_args(_args(tiny_sd_model, url, tmp_path / "s3", *common, *streamed, "--resume")))
        assert resumed.steps == 8
        assert _logged(stopped, "train/loss") + _logged(resumed, "train/loss") == _logged(local, "train/loss")
        assert _same_weights(tmp_path / "local", tmp_path / "s3")
        cached = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".arrow")]
        assert 1 <= len(cached) and sum(p.stat().st_size for p in cached) <= cap_gb * 1e9
    finally:
        server.stop()



def test_a_shard_repacked_after_a_re_cache_is_fetched_again_and_a_cut_short_cached_copy_is_refetched(
        tiny_sd_model, cached_dataset, tmp_path, s3_env, capsys):
    """A repack rewrites a changed shard under its old name (its pairs are the same); the run's cache must not
    answer with the old bytes. A copy in the cache cut short (a full disk, a killed copy) is fetched again,
    not blamed on the store."""
    from cachetrain.sidecar import read_sidecar_file, write_sidecar

    common = ("--batch_size", "4", "--max_steps", "4", "--shard_cache_dir", str(tmp_path / "cache"))
    shards = _shards(cached_dataset, tmp_path)
    server, endpoint = _start_server(s3_env)
    try:
        url = _upload(shards, endpoint)
        assert train(parse_train_args(_args(tiny_sd_model, url, tmp_path / "first", *common))).exit_status == 0
        for latent_path in sorted(cached_dataset.rglob("*.img_sdvae"))[:6]:  # re-cached: other latents
            tensors, metadata = read_sidecar_file(latent_path)
            write_sidecar(latent_path, {name: -tensor for name, tensor in tensors.items()}, metadata)
        before = {shard["name"] for shard in json.loads((shards / "shards.json").read_text())["shards"]}
        assert pack([str(cached_dataset), "--out", str(shards), "--pairs_per_shard", "4"]) == 0
        assert before == {shard["name"] for shard in json.loads((shards / "shards.json").read_text())["shards"]}
        _upload(shards, endpoint)
        train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "local", *common)))
        assert train(parse_train_args(_args(tiny_sd_model, url, tmp_path / "again", *common))).exit_status == 0
        assert _same_weights(tmp_path / "local", tmp_path / "again")
        assert not _same_weights(tmp_path / "first", tmp_path / "again")

        for cached in (tmp_path / "cache").glob("*.arrow"):
            cached.write_bytes(cached.read_bytes()[:1000])
        capsys.readouterr()
        assert train(parse_train_args(_args(tiny_sd_model, url, tmp_path / "cut", *common))).exit_status == 0
        assert "skipped" not in capsys.readouterr().err
        assert _same_weights(tmp_path / "local", tmp_path / "cut")
    finally:
        server.stop()

@pytest.mark.slow
def test_a_server_gone_mid_run_stops_with_the_halted_status_naming_it_and_a_resume_finishes_the_same_run(
        tiny_sd_model, cached_dataset, tmp_path, s3_env, capsys):
    shards = _shards(cached_dataset, tmp_path)
    server, endpoint = _start_server(s3_env)
    url = _upload(shards, endpoint)
    common = ("--batch_size", "4", "--max_steps", "24", "--save_steps", "2", "--shard_retries", "2",
              "--shard_cache_dir", str(tmp_path / "cache"), "--shard_cache_gb", "0.000000001")
    reference = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "reference", *common)))
    assert reference.steps == 24

    def stop_server_after_the_first_checkpoint():
        while not (tmp_path / "run" / "checkpoint-00002").exists():
            time.sleep(0.05)
        server.stop()

    watcher = threading.Thread(target=stop_server_after_the_first_checkpoint, daemon=True)
    watcher.start()
    status = main(_args(tiny_sd_model, url, tmp_path / "run", *common))
    watcher.join(timeout=60)
    err = capsys.readouterr().err
    assert status == 5
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and f"{url}/shard-" in message[0] and "no answer after 2 tries" in message[0]
    assert "continue with --resume" in message[0]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["exit_status"] == 5
    server, endpoint = _start_server(s3_env)  # the storage is back (at another port: the same URL)
    try:
        _upload(shards, endpoint)
        assert main(_args(tiny_sd_model, url, tmp_path / "run", *common, "--resume", "auto")) == 0
    finally:
        server.stop()
    assert _same_weights(tmp_path / "reference", tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_credentials_the_store_refuses_stop_the_start_in_one_line_with_status_2(tiny_sd_model, tmp_path, s3_env,
                                                                                capsys):
    port = _free_port()  # a server that checks credentials: none of ours are known to it
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        s3_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        status = main(_args(tiny_sd_model, f"s3://{BUCKET}/sd15/shards", tmp_path / "run", "--shard_retries", "2",
                            "--shard_cache_dir", str(tmp_path / "cache")))
    finally:
        server.terminate()
        server.wait(timeout=30)
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"s3://{BUCKET}/sd15/shards" in lines[0] and "access refused" in lines[0]
    assert not (tmp_path / "cache").exists()
