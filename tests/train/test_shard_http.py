"""Training from shards served over HTTP: Python's http.server on 127.0.0.1 serves a packed folder (plain
http: no certificate; https:// takes the same path). The run equals the local one; a shard the server
does not have is named and its pairs passed over; a URL with no manifest is refused at start (status 2)."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cachetrain.commands import pack
from cachetrain.train.trainer import main
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401  (the test's output stays the trainer's)
        pass


@pytest.fixture
def served(tmp_path):
    """(the packed folder, the URL that serves it)."""
    folder = tmp_path / "served"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/sd15"
    finally:
        server.shutdown()
        server.server_close()


def test_a_run_from_shards_over_http_equals_the_local_run_and_names_a_shard_the_server_lacks(
        tiny_sd_model, cached_dataset, tmp_path, served, capsys):
    folder, url = served
    shards = folder / "sd15"
    assert pack([str(cached_dataset), "--out", str(shards), "--pairs_per_shard", "8"]) == 0
    common = ("--batch_size", "8", "--max_steps", "3", "--max_bad_fraction", "0.9")
    assert main(_args(tiny_sd_model, shards, tmp_path / "local", *common)) == 0
    assert main(_args(tiny_sd_model, url, tmp_path / "http", *common,
                      "--shard_cache_dir", str(tmp_path / "cache"))) == 0
    local, remote = _unet_weights(tmp_path / "local"), _unet_weights(tmp_path / "http")
    assert all(torch.equal(local[name], remote[name]) for name in local)
    assert any(p.name.endswith(".arrow") for p in (tmp_path / "cache").iterdir())  # fetched into the local cache

    name = json.loads((shards / "shards.json").read_text())["shards"][0]["name"]
    (shards / name).unlink()  # the server answers 404 for it
    capsys.readouterr()
    assert main(_args(tiny_sd_model, url, tmp_path / "missing", *common,
                      "--shard_cache_dir", str(tmp_path / "fresh-cache"))) == 0
    err = capsys.readouterr().err
    assert f"{url}/{name}#row" in err and "shard is missing" in err


def test_a_url_the_server_has_no_manifest_for_is_refused_in_one_line_with_status_2(tiny_sd_model, tmp_path,
                                                                                 served, capsys):
    folder, url = served
    folder.mkdir()
    cache = tmp_path / "cache"
    assert main(_args(tiny_sd_model, url, tmp_path / "run", "--shard_retries", "2",
                      "--shard_cache_dir", str(cache))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0] and "no shard manifest shards.json there" in errors[0]
    assert not cache.exists()  # the refused start made its cache folder and took it away again
