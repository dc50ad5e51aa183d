#!/usr/bin/env python3
"""Shards: packing rate, loader pairs/s from local shards, from a local S3 server and from per-file
sidecars (the trainer's own reader, DataLoader and collate), and the time to the first batch.

SD1.5 shapes: 4x64x64 latents and 77x768 embeddings, fp16. The S3 server is moto's, started on
127.0.0.1 in another process (pip install "moto[server]" boto3). The start-up figure uses a manifest
of --start_pairs pairs whose shards are links to one real shard: it measures reading the manifest,
building the index and the epoch order, and the first batch.

    .venv/bin/python bench/bench_shards.py --pairs 4000 --workers 2 --batch_size 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cachetrain.cache.pack import main as pack_main  # noqa: E402
from cachetrain.sidecar import CLIP_L_SUFFIX, SD_VAE_SUFFIX  # noqa: E402
from cachetrain.tiny.models import write_random_pairs  # noqa: E402
from cachetrain.train.epoch_order import EpochOrder, RunBatches  # noqa: E402
from cachetrain.train.loader import CachedPairDataset, NoisePlan, RefillingBatchReader, make_training_loader  # noqa: E402
from cachetrain.train.shard_data import ShardIndex, ShardStore  # noqa: E402
from cachetrain.tree import index_training_pairs  # noqa: E402


def loader_rate(index, batch_size: int, workers: int, epochs: int) -> float:
    """Pairs/s through the training reader, epochs after the first (which warms caches)."""
    order = EpochOrder(len(index), batch_size, seed=0)
    rates = []
    for epoch in range(epochs):
        loader = make_training_loader(RefillingBatchReader(CachedPairDataset(index, NoisePlan(seed=0)), order),
                                      RunBatches(order, epoch, 0, epochs=1), workers, pin_memory=False)
        start = time.perf_counter()
        pairs = sum(batch.latents.shape[0] for batch in loader)
        rates.append(pairs / (time.perf_counter() - start))
    timed = rates[1:] or rates
    return sum(timed) / len(timed)


def start_s3_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def start_up_seconds(shards: Path, pairs: int, batch_size: int, scratch: Path) -> tuple[float, int]:
    """Manifest of at least ``pairs`` rows in whole shards (files linked to the real ones, so each lists the
    keys its file holds) -> index, epoch order, first batch. (seconds, rows)"""
    manifest = json.loads((shards / "shards.json").read_text())
    real = manifest["shards"]
    big = scratch / "start"
    big.mkdir()
    rows_per = real[0]["rows"]
    names, shard_entries, made = [], [], 0
    while made < pairs:
        source = real[len(names) % len(real)]
        name = f"shard-{len(names):08d}.arrow"
        os.symlink(shards / source["name"], big / name)
        shard_entries.append({**source, "name": name})
        names.append(name)
        made += source["rows"]
    (big / "shards.json").write_text(json.dumps({**manifest, "shards": shard_entries}, separators=(",", ":")))
    del manifest, shard_entries
    started = time.perf_counter()
    index, _ = ShardIndex.open(ShardStore(str(big)))
    order = EpochOrder(len(index), batch_size, seed=0)
    reader = RefillingBatchReader(CachedPairDataset(index, NoisePlan(seed=0)), order)
    first = next(iter(make_training_loader(reader, RunBatches(order, 0, 0), 0, pin_memory=False)))
    elapsed = time.perf_counter() - started
    assert first.latents.shape[0] == batch_size and rows_per
    return elapsed, len(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="the first warms the page cache and is not timed")
    parser.add_argument("--pairs_per_shard", type=int, nargs="+", default=[512])
    parser.add_argument("--start_pairs", type=int, default=1_000_000)
    parser.add_argument("--no_s3", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as folder:
        root = Path(folder)
        write_random_pairs(root / "tree", args.pairs, (4, 64, 64), (77, 768), torch.float16, folders=16)
        tree_index, _ = index_training_pairs([root / "tree"], SD_VAE_SUFFIX, CLIP_L_SUFFIX)
        print(f"per-file loader: {loader_rate(tree_index, args.batch_size, args.workers, args.epochs):,.0f} pairs/s")
        for per_shard in args.pairs_per_shard:
            out = root / f"shards-{per_shard}"
            started = time.perf_counter()
            assert pack_main([str(root / "tree"), "--out", str(out), "--pairs_per_shard", str(per_shard)]) == 0
            seconds = time.perf_counter() - started
            sizes = [p.stat().st_size for p in out.glob("shard-*.arrow")]
            index, _ = ShardIndex.open(ShardStore(str(out)))
            rate = loader_rate(index, args.batch_size, args.workers, args.epochs)
            print(f"--pairs_per_shard {per_shard}: packed {args.pairs / seconds:,.0f} pairs/s, {len(sizes)} shards "
                  f"of {sum(sizes) / len(sizes) / 1e6:.1f} MB on average; local shard loader {rate:,.0f} pairs/s")
        shards = root / f"shards-{args.pairs_per_shard[0]}"
        if not args.no_s3:
            import boto3

            server, endpoint = start_s3_server(root)
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
            try:
                client = boto3.client("s3", endpoint_url=endpoint)
                client.create_bucket(Bucket="bench-shards")
                for path in shards.iterdir():
                    client.upload_file(str(path), "bench-shards", f"sd15/{path.name}")
                store = ShardStore("s3://bench-shards/sd15", cache_dir=str(root / "s3-cache"))
                index, _ = ShardIndex.open(store)
                started = time.perf_counter()
                cold = loader_rate(index, args.batch_size, args.workers, 1)
                print(f"S3 (moto on 127.0.0.1), first epoch (fetching every shard): {cold:,.0f} pairs/s "
                      f"({time.perf_counter() - started:.1f} s)")
                print(f"S3, later epochs (shards in the local cache): "
                      f"{loader_rate(index, args.batch_size, args.workers, args.epochs):,.0f} pairs/s")
            finally:
                server.terminate()
                server.wait()
        seconds, rows = start_up_seconds(shards, args.start_pairs, args.batch_size, root)
        print(f"time to the first batch from a {rows:,}-pair shard set: {seconds:.1f} s")
        print(f"{os.cpu_count()} CPUs, {args.workers} workers, batch {args.batch_size}")


if __name__ == "__main__":
    main()
