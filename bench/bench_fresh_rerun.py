#!/usr/bin/env python3
"""A cache rerun that finds everything fresh: ``create_img_sdvae.py`` over an already-cached tree, and
where its time goes.

    .venv/bin/python bench/bench_fresh_rerun.py [--images 100000] [--tree /tmp/fresh-rerun-bench] [--profile]

1. once: writes ``--images`` tiny PNGs (8x8; 1,000 per folder), a tiny model and the sidecars the script
   writes for them (the same metadata; a zero latent) under ``--tree``, then lets the real script
   (``--resolution 8``) bring the data index up to date; a later run reuses the tree when it holds as
   many images (``tree.json``);
2. times the real script's rerun start to exit (``--repeats``, best kept) and reads its summary (every
   image must be skipped fresh);
3. in this process, times the rerun's phases one by one, as run_cache_build calls them: the walk
   (scan_roots), loading the VAE, the orphan check, the freshness decisions (plan: a stat of each image and of its sidecar,
   and a header read where the data index cannot vouch for the sidecar), and the data index update;
4. ``--profile``: the decisions under cProfile (the top functions by their own time), and the whole
   script's rerun under cProfile (by cumulative time).

The decision rate is images over the walk, the orphan check, the decisions and the index update: what grows with
the tree. The start-up (Python, torch and diffusers imports, the model load) is a fixed cost, given apart.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import os
import pstats
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_FOLDER = 1000
RESOLUTION = 8
TREE_RECORD = "tree.json"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def script_args(model: Path, tree: Path) -> list[str]:
    return ["--model", str(model), "--data_root", str(tree), "--resolution", str(RESOLUTION), "--no_progress",
            "--batch_size", "256", "--num_workers", "1"]


def prepare(work: Path, images: int) -> float | None:
    """The tree (reused when it holds ``images``), in the state a finished cache run leaves. Returns the
    seconds the preparation took, or None when reused."""
    record, tree, model = work / TREE_RECORD, work / "data", work / "model"
    if record.exists() and json.loads(record.read_text()).get("images") == images:
        return None
    started = time.perf_counter()
    if not model.exists():
        from cachetrain.tiny.models import build_tiny_sd

        build_tiny_sd(model, seed=0)
    write_cached_tree(model, tree, images)
    # one real rerun: brings the data index up to date, as the script leaves it after caching
    done = run_script(model, tree)
    if done.returncode != 0:
        raise SystemExit(f"indexing the tree failed ({done.returncode}): {done.stderr[-2000:]}")
    record.write_text(json.dumps({"images": images}))
    return round(time.perf_counter() - started, 1)


def write_cached_tree(model: Path, tree: Path, images: int) -> None:
    """``images`` tiny PNGs with the sidecars the script would write for them: the same metadata (what a
    rerun compares), a zero latent of the right shape (encoding 100k images on a shared 2-core machine
    takes far longer, and a rerun never reads the latent). Images that already have a sidecar keep it."""
    import torch
    from PIL import Image

    from cachetrain.cache.image_cache import ImageLatentBuilder
    from cachetrain.models import loading
    from cachetrain.freshness import content_digest, image_source_identity
    from cachetrain.sidecar import IMAGE_LATENT_KEY, SD_VAE_SUFFIX, write_sidecar

    builder = ImageLatentBuilder(vae=loading.load_vae(str(model), dtype=torch.float32),
                                 model_name=loading.model_name(str(model)), resolution=RESOLUTION,
                                 device=torch.device("cpu"), dtype=torch.float32, save_dtype=torch.float16,
                                 batch_size=256, num_workers=1, out_suffix=SD_VAE_SUFFIX)
    settings = {**builder.settings_metadata(), "encoder": builder.model_name, "size": f"{RESOLUTION}x{RESOLUTION}"}
    latent = torch.zeros(4, RESOLUTION // 2, RESOLUTION // 2, dtype=torch.float16)  # the tiny VAE halves
    picture = io.BytesIO()
    Image.new("RGB", (RESOLUTION, RESOLUTION), (200, 30, 30)).save(picture, format="PNG")
    for i in range(images):
        folder = tree / f"f{i // PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"i{i:07d}.png"
        if not image.exists():
            image.write_bytes(picture.getvalue())
        sidecar = image.with_suffix(SD_VAE_SUFFIX)
        if not sidecar.exists():
            write_sidecar(sidecar, {IMAGE_LATENT_KEY: latent},
                          {**settings, **image_source_identity(image), **content_digest(picture.getvalue())})


def run_script(model: Path, tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "create_img_sdvae.py", *script_args(model, tree)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})


def time_script(model: Path, tree: Path, images: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        load = load_average()
        started = time.perf_counter()
        done = run_script(model, tree)
        seconds = time.perf_counter() - started
        fresh = re.search(r"skipped fresh (\d+)", done.stderr)
        if done.returncode != 0 or not fresh or int(fresh.group(1)) != images:
            raise SystemExit(f"the rerun did not find {images} fresh ({done.returncode}): {done.stderr[-2000:]}")
        print(f"script rerun: {seconds:.2f} s, load average before it {load}", flush=True)
        if best is None or seconds < best["s"]:
            best = {"s": round(seconds, 2), "images_per_s": round(images / seconds), "load_average": load}
    return best


def profile_script(model: Path, tree: Path, lines: int = 30) -> str:
    """The script's rerun under cProfile (main thread; the freshness threads' work shows as waits)."""
    done = subprocess.run([sys.executable, "-m", "cProfile", "-s", "cumulative", "create_img_sdvae.py",
                           *script_args(model, tree)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    return "\n".join(done.stdout.splitlines()[: lines + 8])


def time_phases(model: Path, tree: Path, images: int, profile: bool) -> dict:
    """The rerun's phases in this process, in run_cache_build's order."""
    started = time.perf_counter()
    import torch

    from cachetrain.cache.build import CacheSettings, update_data_indexes
    from cachetrain.cache.image_cache import ImageLatentBuilder
    from cachetrain.cache import plan as plan_module
    from cachetrain.cache.plan import drop_name_clashes, plan, scan_roots
    from cachetrain.cache.summary import CacheSummary
    from cachetrain.models import loading
    from cachetrain.sidecar import DEFAULT_IMAGE_EXTENSIONS, SD_VAE_SUFFIX

    phases = {"imports": time.perf_counter() - started}
    settings = CacheSettings([str(tree)], SD_VAE_SUFFIX, DEFAULT_IMAGE_EXTENSIONS, show_progress=False)
    load = load_average()

    started = time.perf_counter()
    vae = loading.load_vae(str(model), dtype=torch.float32)
    builder = ImageLatentBuilder(vae=vae, model_name=loading.model_name(str(model)), resolution=RESOLUTION,
                                 device=torch.device("cpu"), dtype=torch.float32, save_dtype=torch.float16,
                                 batch_size=256, num_workers=1, out_suffix=SD_VAE_SUFFIX)
    phases["model_load"] = time.perf_counter() - started

    started = time.perf_counter()
    scan = scan_roots(settings.data_roots, settings.extensions, settings.out_suffix)
    sources = drop_name_clashes(scan.sources, None)
    phases["walk"] = time.perf_counter() - started

    started = time.perf_counter()
    if "scan_orphans" in dir(plan_module):
        orphans = plan_module.scan_orphans(scan, settings.out_suffix)
    else:
        orphans = plan_module.find_orphans(scan.sidecars, scan.sources + scan.other_images, settings.out_suffix,
                                           settings.extensions)
    assert orphans == []
    phases["orphans"] = time.perf_counter() - started

    summary = CacheSummary()
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    record = None
    if "record" in inspect.signature(plan).parameters:  # the data index's fresh digests (absent before them)
        from cachetrain.fresh_digests import FreshnessRecord

        record = FreshnessRecord(settings.data_roots, settings.out_suffix)
    todo = plan(sources, builder.expected_metadata, builder.source_digest, settings.out_suffix, False, summary,
                [], **({"record": record} if record is not None else {}))
    if profiler:
        profiler.disable()
    phases["decide"] = time.perf_counter() - started
    assert todo == [] and summary.counts["fresh"] == images, (len(todo), summary.counts)

    started = time.perf_counter()
    update_data_indexes(settings, set())
    phases["index_update"] = time.perf_counter() - started

    per_image = phases["walk"] + phases["orphans"] + phases["decide"] + phases["index_update"]
    result = {name: round(seconds, 3) for name, seconds in phases.items()}
    result.update(decision_rate_images_per_s=round(images / per_image), load_average=load)
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        result["profile"] = text.getvalue()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--tree", default="/tmp/fresh-rerun-bench", help="built once here, reused after")
    parser.add_argument("--repeats", type=int, default=2, help="script reruns timed (the best is kept)")
    parser.add_argument("--profile", action="store_true", help="also profile the decisions (cProfile)")
    args = parser.parse_args()
    work = Path(args.tree)
    results: dict = {"images": args.images, "cores": os.cpu_count()}
    results["prepare_s"] = prepare(work, args.images)
    time.sleep(4)  # folders older than the data index's racy window, as in a tree cached a while ago
    results["script_rerun"] = time_script(work / "model", work / "data", args.images, args.repeats)
    print("script rerun", results["script_rerun"], flush=True)
    results["phases"] = time_phases(work / "model", work / "data", args.images, args.profile)
    profile = results["phases"].pop("profile", None)
    print(json.dumps(results, indent=1))
    if profile:
        print(profile)
        print(profile_script(work / "model", work / "data"))


if __name__ == "__main__":
    main()
