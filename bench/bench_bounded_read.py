#!/usr/bin/env python3
"""The read bound's cost per read: one SD1.5-sized sidecar pair read again and again from the page cache, as the
loader reads it (sidecar.read_sidecar_tensors + read_text_variants), with the bound (a hand-over to a worker
thread per file) and without (--read_timeout 0: read in the caller's thread). Rounds alternate, so a busy
machine slows both alike.

    .venv/bin/python bench/bench_bounded_read.py --reads 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cachetrain import bounded_read, sidecar  # noqa: E402


def _pair_reads_per_second(latent: Path, text: Path, reads: int) -> float:
    start = time.perf_counter()
    for _ in range(reads):
        sidecar.read_sidecar_tensors(latent, [sidecar.IMAGE_LATENT_KEY])
        sidecar.read_text_variants(text)
    return reads / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000, help="pairs read per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-bounded-read-") as folder:
        latent, text = Path(folder) / "x.img_sdvae", Path(folder) / "x.txt_clipl"
        sidecar.write_sidecar(latent, {"latent": torch.randn(4, 64, 64).half()}, {})
        sidecar.write_sidecar(text, {"emb": torch.randn(77, 768).half()}, {})
        rates: dict[str, list[float]] = {"bounded": [], "unbounded": []}
        for _ in range(args.rounds):
            for mode, timeout in (("bounded", bounded_read.DEFAULT_READ_TIMEOUT), ("unbounded", 0.0)):
                bounded_read.set_read_timeout(timeout)
                rates[mode].append(_pair_reads_per_second(latent, text, args.reads))
    for mode, values in rates.items():
        median = statistics.median(values)
        print(f"{mode}: {median:,.0f} pairs/s ({1e6 / median:.0f} us per pair, median of {len(values)} rounds)")
    extra = 1e6 / statistics.median(rates["bounded"]) - 1e6 / statistics.median(rates["unbounded"])
    print(f"the bound costs {extra:.0f} us per pair (two files)")


if __name__ == "__main__":
    main()
