#!/usr/bin/env python3
"""Shard engines compared on SD1.5 shapes (latent 4x64x64 fp16 + text 77x768 fp16): packing rate and
read rate of webdataset tar shards and pyarrow parquet and Arrow IPC shards, streamed and at random, beside the
per-file sidecars. Each pair is read to tensors (safetensors bytes in the shards, as packed). One
process; the timed pass follows a warm-up pass (page cache).

    .venv/bin/python bench/bench_shard_engines.py --pairs 2000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from safetensors.torch import load as load_safetensors  # noqa: E402

from cachetrain.sidecar import read_sidecar  # noqa: E402
from cachetrain.tiny.models import write_random_pairs  # noqa: E402
from cachetrain.tree import index_training_pairs  # noqa: E402


def rate(label: str, read) -> None:
    read()  # warm-up
    started = time.perf_counter()
    count = read()
    print(f"{label}: {count / (time.perf_counter() - started):,.0f} pairs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--pairs_per_shard", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    count, per = args.pairs, args.pairs_per_shard
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as folder:
        root = Path(folder)
        write_random_pairs(root / "tree", count, (4, 64, 64), (77, 768), torch.float16, folders=8)
        index, _ = index_training_pairs([root / "tree"], ".img_sdvae", ".txt_clipl")
        pairs = [index[i] for i in range(len(index))]
        rate("per-file sidecars (read_sidecar)",
             lambda: sum(1 for a, b in pairs if read_sidecar(a, "latent") is not None and read_sidecar(b, "emb") is not None))
        (root / "tar").mkdir()
        (root / "parquet").mkdir()
        started = time.perf_counter()
        for k in range(0, count, per):
            with wds.TarWriter(str(root / "tar" / f"shard-{k // per:05d}.tar")) as writer:
                for a, b in pairs[k:k + per]:
                    writer.write({"__key__": Path(a).stem, "img_sdvae": Path(a).read_bytes(), "txt_clipl": Path(b).read_bytes()})
        print(f"pack webdataset tar: {count / (time.perf_counter() - started):,.0f} pairs/s")
        started = time.perf_counter()
        schema = pa.schema([("key", pa.string()), ("img", pa.binary()), ("txt", pa.binary())])
        for k in range(0, count, per):
            rows = pairs[k:k + per]
            table = pa.table({"key": [Path(a).stem for a, _ in rows], "img": [Path(a).read_bytes() for a, _ in rows],
                              "txt": [Path(b).read_bytes() for _, b in rows]}, schema=schema)
            pq.write_table(table, root / "parquet" / f"shard-{k // per:05d}.parquet", compression="none", row_group_size=64)
        print(f"pack parquet: {count / (time.perf_counter() - started):,.0f} pairs/s")
        (root / "arrow").mkdir()
        started = time.perf_counter()
        for k in range(0, count, per):
            rows = pairs[k:k + per]
            table = pa.table({"key": [Path(a).stem for a, _ in rows], "img": [Path(a).read_bytes() for a, _ in rows],
                              "txt": [Path(b).read_bytes() for _, b in rows]}, schema=schema)
            with pa.OSFile(str(root / "arrow" / f"shard-{k // per:05d}.arrow"), "wb") as sink:
                with pa.ipc.new_file(sink, schema) as writer:
                    writer.write_table(table, max_chunksize=64)
        print(f"pack arrow ipc: {count / (time.perf_counter() - started):,.0f} pairs/s")
        arrows = sorted(str(p) for p in (root / "arrow").iterdir())
        tars = sorted(str(p) for p in (root / "tar").iterdir())
        parquets = sorted(str(p) for p in (root / "parquet").iterdir())

        def webdataset_stream():
            n = 0
            for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
                load_safetensors(sample["img_sdvae"])["latent"], load_safetensors(sample["txt_clipl"])["emb"]
                n += 1
            return n

        def parquet_stream():
            n = 0
            for path in parquets:
                for batch in pq.ParquetFile(path, memory_map=True).iter_batches(batch_size=64):
                    for a, b in zip(batch.column("img").to_pylist(), batch.column("txt").to_pylist()):
                        load_safetensors(a)["latent"], load_safetensors(b)["emb"]
                        n += 1
            return n

        order = list(range(count))
        random.Random(0).shuffle(order)

        def parquet_random():
            tables = [pq.read_table(path, memory_map=True) for path in parquets]
            for i in order:
                table, row = tables[i // per], i % per
                load_safetensors(table.column("img")[row].as_py())["latent"]
                load_safetensors(table.column("txt")[row].as_py())["emb"]
            return len(order)

        def arrow_random(open_shards: int):
            """Rows at random, at most ``open_shards`` shards open at once (opened again when needed)."""
            opened: dict[int, object] = {}
            for i in order:
                shard, row = i // per, i % per
                if shard not in opened:
                    if len(opened) >= open_shards:
                        opened.pop(next(iter(opened)))
                    opened[shard] = pa.ipc.open_file(pa.memory_map(arrows[shard], "r")).read_all()
                table = opened[shard]
                load_safetensors(table.column("img")[row].as_py())["latent"]
                load_safetensors(table.column("txt")[row].as_py())["emb"]
            return len(order)

        def parquet_random_reopened():
            opened: dict[int, object] = {}
            for i in order[:200]:
                shard, row = i // per, i % per
                if shard not in opened:
                    if len(opened) >= 1:
                        opened.pop(next(iter(opened)))
                    opened[shard] = pq.read_table(parquets[shard], memory_map=True)
                load_safetensors(opened[shard].column("img")[row].as_py())["latent"]
            return 200

        def tar_random():  # tar members by offset (what webdataset's indexed reader does)
            members = []
            for path in tars:
                with tarfile.open(path) as archive:
                    by_key: dict[str, dict] = {}
                    for info in archive.getmembers():
                        key, ext = info.name.split(".", 1)
                        by_key.setdefault(key, {})[ext] = (info.offset_data, info.size)
                    members += [(path, entry) for _, entry in sorted(by_key.items())]
            handles = {path: open(path, "rb") for path in tars}
            for i in order:
                path, entry = members[i]
                handle = handles[path]
                for ext, key in (("img_sdvae", "latent"), ("txt_clipl", "emb")):
                    handle.seek(entry[ext][0])
                    load_safetensors(handle.read(entry[ext][1]))[key]
            return len(order)

        rate("webdataset tar, streamed", webdataset_stream)
        rate("parquet (pyarrow), streamed", parquet_stream)
        rate("parquet (pyarrow), random rows of memory-mapped shards", parquet_random)
        rate("tar, random members by offset", tar_random)
        rate("arrow ipc (pyarrow), random rows, every shard open", lambda: arrow_random(len(arrows)))
        rate("arrow ipc, random rows, one shard open at a time (re-opened per row)", lambda: arrow_random(1))
        rate("parquet, random rows, one shard open at a time (re-read per row)", parquet_random_reopened)
        print(f"bytes per pair: arrow {sum(os.path.getsize(p) for p in arrows) // count:,}, "
              f"tar {sum(os.path.getsize(p) for p in tars) // count:,}, "
              f"parquet {sum(os.path.getsize(p) for p in parquets) // count:,}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
