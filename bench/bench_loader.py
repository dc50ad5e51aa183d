#!/usr/bin/env python3
"""Loader throughput: sidecar pairs/s from the page cache, through the trainer's own Dataset + collate.

SD1.5 shapes: 4x64x64 latents and 77x768 embeddings, both fp16, with per-sample noise drawn in the
workers as in training. Goal: >= 2,000 pairs/s on 2 cores.

    .venv/bin/python bench/bench_loader.py --pairs 4000 --workers 2 --batch_size 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cachetrain.train.epoch_order import epoch_batches  # noqa: E402
from cachetrain.train.loader import CachedPairDataset, NoisePlan, make_loader  # noqa: E402
from cachetrain.sidecar import CLIP_L_SUFFIX, SD_VAE_SUFFIX  # noqa: E402
from cachetrain.tiny.models import write_random_pairs  # noqa: E402
from cachetrain.tree import index_training_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="the first warms the page cache and is not timed")
    parser.add_argument("--read_timeout", type=float, default=None,
                        help="the bound on each read, as the trainer's flag (0: reads unbounded, in the worker itself)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.read_timeout is not None:
        from cachetrain.bounded_read import set_read_timeout

        set_read_timeout(args.read_timeout)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
        root = Path(folder)
        write_random_pairs(root, args.pairs, (4, 64, 64), (77, 768), torch.float16, folders=16)
        index, _ = index_training_pairs([root], SD_VAE_SUFFIX, CLIP_L_SUFFIX)
        dataset = CachedPairDataset(index, NoisePlan(seed=0))
        rates = []
        for epoch in range(args.epochs):
            dataset.epoch = epoch
            loader = make_loader(dataset, epoch_batches(len(index), args.batch_size, 0, epoch), args.workers,
                                 pin_memory=False)
            start = time.perf_counter()
            pairs = sum(batch.latents.shape[0] for batch in loader)
            elapsed = time.perf_counter() - start
            rates.append(pairs / elapsed)
            print(f"epoch {epoch}: {pairs} pairs in {elapsed:.2f} s = {pairs / elapsed:,.0f} pairs/s"
                  f"{' (page-cache warm-up)' if epoch == 0 else ''}")
        timed = rates[1:] or rates
        print(f"loader: {sum(timed) / len(timed):,.0f} pairs/s with {args.workers} workers, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
