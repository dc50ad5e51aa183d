"""What the noise variants cost the loader's workers: per-sample draw time of the plain noise, and with
pyramid noise, input perturbation and both, for one latent shape (default SD1.5 512 px, 4x64x64).

    python bench/bench_noise_variants.py [--shape 4 64 64] [--samples 400] [--rounds 3]

Prints one JSON line per variant: best-of-rounds microseconds per sample (the variants alternate
within each round, so all see the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cachetrain.train.noise_variants import NoiseVariants, draw_noise_variants  # noqa: E402
from cachetrain.train.objective import draw_sample_noise, sample_key  # noqa: E402

VARIANTS = {"plain": None, "multires_noise_iterations 6": NoiseVariants(6, 0.3, 0.0),
            "ip_noise_gamma 0.1": NoiseVariants(0, 0.3, 0.1), "both": NoiseVariants(6, 0.3, 0.1)}


def draw(shape: tuple[int, ...], variants: NoiseVariants | None, sample: int) -> None:
    key = sample_key(0, 0, sample)
    noise, _, _ = draw_sample_noise(shape, 0.0, key)
    if variants is not None:
        draw_noise_variants(noise, key, variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 64, 64])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one loader worker
    shape = tuple(args.shape)
    best = {name: float("inf") for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variants in VARIANTS.items():
            for sample in range(10):
                draw(shape, variants, sample)
            started = time.perf_counter()
            for sample in range(args.samples):
                draw(shape, variants, sample)
            best[name] = min(best[name], (time.perf_counter() - started) / args.samples)
    for name, seconds in best.items():
        print(json.dumps({"variant": name, "shape": list(shape), "us_per_sample": round(seconds * 1e6, 1),
                          "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
