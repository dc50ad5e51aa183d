#!/usr/bin/env python3
"""What the cache scripts' --verify costs: sha256 of every image, on the freshness check's threads.

Writes --files files of --megabytes each (random bytes, the size of a typical training JPEG), then hashes
them all with freshness.file_content_digest on cache.plan.PLAN_THREADS threads, as plan() does with --verify.
Reports MB/s and files/s. The files were just written, so they come from the page cache: this is the
hashing rate, an upper bound; on cold or network storage the read rate of the disk bounds it instead.

    .venv/bin/python bench/bench_verify_hash.py [--files 200] [--megabytes 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachetrain.cache.plan import PLAN_THREADS  # noqa: E402
from cachetrain.freshness import file_content_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--megabytes", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = int(args.megabytes * (1 << 20))
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.files):
            path = Path(folder) / f"image{i:05d}.jpg"
            path.write_bytes(os.urandom(size))
            paths.append(path)
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
                list(pool.map(file_content_digest, paths))
            best = min(best, time.perf_counter() - started)
    total_mb = args.files * size / (1 << 20)
    print(f"{args.files} files x {args.megabytes:g} MB, {PLAN_THREADS} threads, {os.cpu_count()} CPUs: "
          f"best of {args.repeats}: {best:.2f} s, {total_mb / best:.0f} MB/s, {args.files / best:.0f} files/s")


if __name__ == "__main__":
    main()
