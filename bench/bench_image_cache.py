#!/usr/bin/env python3
"""Image caching with decode in DataLoader workers against the same work in one serial loop.

Both sides use the same tiny VAE (cachetrain.tiny.TINY_VAE), the same real JPEGs (photo-like
content, 512-1024 px a side) and the same functions (images.load_image, the VAE's encode,
sidecar.write_sidecar). The serial loop decodes, encodes and writes one batch after another in
one process; the cache builder (run_cache_build + ImageLatentBuilder) decodes in ``--workers``
processes and writes on background threads. Each is timed with JPEG draft decoding on (the
default) and off (every pixel decoded), best of ``--repeats`` runs taken in turns.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_image_cache.py --images 512 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachetrain.cache.build import CacheSettings, run_cache_build  # noqa: E402
from cachetrain.cache.image_cache import ImageLatentBuilder, pixels_to_vae_input  # noqa: E402
from cachetrain.cache.images import load_image  # noqa: E402
from cachetrain.sidecar import IMAGE_LATENT_KEY, SD_VAE_SUFFIX, sidecar_path, write_sidecar  # noqa: E402
from cachetrain.tiny.models import TINY_VAE  # noqa: E402


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Overlapping coloured ellipses, sensor-like noise and a slight blur: JPEG sizes like real photos."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(rng.integers(0, 256, 3).tolist()))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse((x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))),
                     fill=tuple(rng.integers(0, 256, 3).tolist()))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def write_jpegs(folder: Path, count: int, unique: int) -> list[str]:
    """``unique`` distinct photos, copied round to ``count`` files (drawing them is the slow part)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"photo{i:05d}.jpg"
        if i < unique:
            photo_like(int(rng.integers(512, 1025)), int(rng.integers(512, 1025)), seed=i).save(path, quality=90)
        else:
            shutil.copyfile(paths[i % unique], path)
        paths.append(str(path))
    return paths


def serial_loop(builder: ImageLatentBuilder, paths: list[str], jpeg_draft: bool) -> None:
    """Decode, encode, write: one batch after the other, in this process."""
    for start in range(0, len(paths), builder.batch_size):
        batch = paths[start : start + builder.batch_size]
        pixels = torch.stack([load_image(p, builder.resolution, jpeg_draft=jpeg_draft).pixels for p in batch])
        with torch.no_grad():
            latents = builder.vae.encode(pixels_to_vae_input(pixels, builder.dtype)).latent_dist.mean
        latents = latents.to(builder.save_dtype)
        for path, latent in zip(batch, latents):
            write_sidecar(sidecar_path(path, SD_VAE_SUFFIX), {IMAGE_LATENT_KEY: latent.clone()},
                          builder.expected_metadata(path))


def worker_build(builder: ImageLatentBuilder, folder: Path, workers: int) -> None:
    settings = CacheSettings(data_roots=[str(folder)], out_suffix=SD_VAE_SUFFIX, extensions=(".jpg",),
                             batch_size=builder.batch_size, overwrite=True, num_workers=workers, show_progress=False)
    summary = run_cache_build(builder, settings)
    assert summary.counts["written"] == len(list(folder.glob("*.jpg"))), summary.render()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def seconds(function) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - start, cpu_seconds() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512,
                        help="enough that starting the workers (~0.1 s) is a small part of the time")
    parser.add_argument("--unique", type=int, default=128, help="distinct photos among them")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--resolution", type=int, default=64, help="the tiny VAE's native resolution")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the encoder gets one core; the workers share what is left

    scratch = Path(tempfile.mkdtemp(prefix="bench-image-cache-"))
    try:
        start = time.perf_counter()
        paths = write_jpegs(scratch / "photos", args.images, args.unique)
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        print(f"wrote {len(paths)} JPEGs ({min(args.unique, args.images)} distinct, 512-1024 px, mean {mean_kb:.0f} KiB) in {time.perf_counter() - start:.1f} s; "
              f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
        torch.manual_seed(0)
        from diffusers import AutoencoderKL

        print(f"load average before: {os.getloadavg()[0]:.2f}")
        vae = AutoencoderKL(**TINY_VAE)
        for jpeg_draft in (False, True):
            label = "JPEG draft decode" if jpeg_draft else "full decode"
            builder = ImageLatentBuilder(vae=vae, model_name="tiny", resolution=args.resolution,
                                         device=torch.device("cpu"), dtype=torch.float32, save_dtype=torch.float16,
                                         batch_size=args.batch_size, num_workers=0, jpeg_draft=jpeg_draft)

            def with_workers(count: int) -> None:
                builder.num_workers = count
                worker_build(builder, scratch / "photos", count)

            # Serial and worker runs take turns, so noise from other work on the shared cores hits
            # both alike; the best of each is kept.
            best = {"serial": (float("inf"), 0.0), **{w: (float("inf"), 0.0) for w in args.workers}}
            for _ in range(args.repeats):
                best["serial"] = min(best["serial"], seconds(lambda: serial_loop(builder, paths, jpeg_draft)))
                for workers in args.workers:
                    best[workers] = min(best[workers], seconds(lambda: with_workers(workers)))
            decode_ms = seconds(lambda: [load_image(p, args.resolution, jpeg_draft=jpeg_draft) for p in paths])[0]
            decode_ms *= 1000 / len(paths)
            serial_ms = best["serial"][0] * 1000 / len(paths)
            # With the encoder in one process and decoding in others, the best possible speed-up
            # on 2 free cores is serial / max(decode, serial - decode).
            bound = serial_ms / max(decode_ms, serial_ms - decode_ms)
            print(f"{label}: serial loop {len(paths) / best['serial'][0]:6.1f} img/s, "
                  f"CPU {best['serial'][1] * 1000 / len(paths):.1f} ms/img ({serial_ms:.1f} ms/img wall, of which "
                  f"decode {decode_ms:.1f} ms: ideal ratio on 2 free cores {bound:.2f}x)")
            for workers in args.workers:
                wall, cpu = best[workers]
                print(f"{label}: {workers} decode worker(s) {len(paths) / wall:6.1f} img/s, "
                      f"CPU {cpu * 1000 / len(paths):.1f} ms/img, ratio {best['serial'][0] / wall:.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
