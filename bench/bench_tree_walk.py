#!/usr/bin/env python3
"""Walking and pairing a large data tree: files per second and bytes per indexed sample.

Builds a synthetic tree of N images (empty files: walking never opens them), each with a caption,
a latent sidecar and a text sidecar (4 N files), then times
  - the trainer's index: tree.index_training_pairs (walk + pair the two sidecars of each sample);
  - the cache builders' scan: cache_plan.scan_roots (walk, split sources from sidecars);
and measures the memory the finished PairIndex holds (tracemalloc, after the walk's garbage is gone).
It also times the cache builders' freshness check (cache_plan.plan: stat the image, read and
compare the sidecar's header) over ``--plan_samples`` real sidecars.

    .venv/bin/python bench/bench_tree_walk.py --images 200000 [--tree /tmp/tree] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachetrain.cache.plan import plan, scan_roots  # noqa: E402
from cachetrain.cache.summary import CacheSummary  # noqa: E402
from cachetrain.freshness import image_source_identity  # noqa: E402
from cachetrain.sidecar import CAPTION_EXTENSION, CLIP_L_SUFFIX, DEFAULT_IMAGE_EXTENSIONS, SD_VAE_SUFFIX, write_sidecar  # noqa: E402
from cachetrain.tree import index_training_pairs  # noqa: E402

FILES_PER_IMAGE = 4  # image, caption, latent sidecar, text sidecar


def build_tree(root: Path, images: int, per_folder: int) -> None:
    """Nested folders of ``per_folder`` samples, with mixed-case extensions like real scrapes."""
    for i in range(images):
        if i % per_folder == 0:
            folder = root / f"shard{i // (per_folder * 50):03d}" / f"part{i // per_folder:05d}"
            folder.mkdir(parents=True, exist_ok=True)
        stem = os.path.join(folder, f"sample_{i:08d}")
        for suffix in (".JPG" if i % 7 == 0 else ".jpg", CAPTION_EXTENSION, SD_VAE_SUFFIX, CLIP_L_SUFFIX):
            os.close(os.open(stem + suffix, os.O_CREAT | os.O_WRONLY, 0o644))


class LatentFreshness:
    """What ImageLatentBuilder.expected_metadata returns, without loading a VAE."""

    settings = {"kind": "image_latent", "encoder_class": "AutoencoderKL", "encoder_fingerprint": "0123456789abcdef",
                "resolution": "512", "crop": "center", "dtype": "float16"}

    def expected_metadata(self, source: str) -> dict[str, str]:
        return {**self.settings, **image_source_identity(source)}


def time_plan(root: Path, samples: int, repeats: int) -> float:
    """Seconds for plan() over ``samples`` images whose sidecars are all fresh."""
    import torch

    builder = LatentFreshness()
    latent = torch.zeros(4, 64, 64, dtype=torch.float16)
    sources = []
    for i in range(samples):
        folder = root / f"part{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"sample_{i:08d}.jpg"
        image.touch()
        write_sidecar(image.with_suffix(SD_VAE_SUFFIX), {"latent": latent}, builder.expected_metadata(str(image)))
        sources.append(str(image))

    def check_all():
        summary = CacheSummary()
        assert plan(sources, builder.expected_metadata, None, SD_VAE_SUFFIX, False, summary) == [] and summary.counts["fresh"] == samples

    return best_of(repeats, check_all)[0]


def best_of(repeats: int, function):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--per_folder", type=int, default=1000)
    parser.add_argument("--tree", default=None, help="reuse or create the tree here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the tree in place for the next run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plan_samples", type=int, default=20_000, help="real sidecars for the freshness check")
    args = parser.parse_args()

    root = Path(args.tree) if args.tree else Path(tempfile.mkdtemp(prefix="bench-tree-"))
    if not (root / ".complete").exists():
        start = time.perf_counter()
        build_tree(root, args.images, args.per_folder)
        (root / ".complete").touch()
        print(f"built {args.images} samples ({args.images * FILES_PER_IMAGE} files) in {time.perf_counter() - start:.1f} s")
    files = args.images * FILES_PER_IMAGE
    try:
        index_time, (index, unpaired) = best_of(
            args.repeats, lambda: index_training_pairs([root], SD_VAE_SUFFIX, CLIP_L_SUFFIX))
        assert len(index) == args.images and unpaired == {"image_only": 0, "text_only": 0}, (len(index), unpaired)
        scan_time, scan = best_of(args.repeats, lambda: scan_roots([str(root)], DEFAULT_IMAGE_EXTENSIONS, SD_VAE_SUFFIX))
        assert len(scan.sources) == len(scan.sidecars) == args.images

        del index, scan
        gc.collect()
        tracemalloc.start()
        index, _ = index_training_pairs([root], SD_VAE_SUFFIX, CLIP_L_SUFFIX)
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        print(f"samples: {args.images}, files in tree: {files}, cores: {os.cpu_count()}")
        print(f"trainer index (walk + pair): {index_time:.2f} s, {files / index_time:,.0f} files/s, "
              f"{args.images / index_time:,.0f} samples/s")
        print(f"cache scan (walk + split):   {scan_time:.2f} s, {files / scan_time:,.0f} files/s")
        plan_root = Path(tempfile.mkdtemp(prefix="bench-plan-"))
        try:
            plan_time = time_plan(plan_root, args.plan_samples, args.repeats)
        finally:
            shutil.rmtree(plan_root)
        print(f"freshness check (plan):      {args.plan_samples / plan_time:,.0f} sidecars/s")
        print(f"PairIndex memory: {retained / len(index):.1f} bytes/sample retained (tracemalloc), "
              f"{index.nbytes() / len(index):.1f} bytes/sample by its own count; "
              f"peak while indexing {peak / len(index):.0f} bytes/sample")
    finally:
        if not args.keep and not args.tree:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
