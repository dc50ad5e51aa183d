"""What the cache builders share: walk, shard, skip fresh sidecars, batch, write, summarise.

A builder (image_cache.ImageLatentBuilder, text_cache.TextEmbeddingBuilder) says what its sources
are, what a fresh sidecar's metadata must hold, and how to encode a batch. ``run_cache_build``
does everything else the same way for all of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from .sidecar import Freshness, check_freshness, sidecar_path, write_sidecar
from .tree import walk_files

FAILURES_SHOWN = 5


@dataclass
class CacheSettings:
    data_roots: list[str]
    out_suffix: str
    extensions: tuple[str, ...]
    batch_size: int = 8
    overwrite: bool = False
    num_workers: int = 2
    shard_index: int = 0
    shard_count: int = 1
    report_path: str | None = None
    show_progress: bool = True


@dataclass
class CacheSummary:
    """Counts of what a run did, and the failures with their reasons (first few kept for display)."""

    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    report_path: str | None = None
    started: float = field(default_factory=time.monotonic)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def fail(self, path: str, reason: str) -> None:
        """Report a file that got no sidecar: printed at once, counted, and written to the report."""
        self.counts["failed"] += 1
        self.failures.append((path, reason))
        tqdm.write(f"[cache] skipped {path}: {reason}", file=sys.stderr)
        if self.report_path:
            with open(self.report_path, "a", encoding="utf-8") as report:
                report.write(json.dumps({"path": path, "reason": reason}) + "\n")

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0

    def render(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.counts["written"]
        lines = [
            f"written {done}, skipped fresh {self.counts['fresh']}, rebuilt stale {self.counts['stale']}, "
            f"legacy kept {self.counts['legacy']}, failed {self.counts['failed']}",
            f"elapsed {elapsed:.1f} s, {done / elapsed if elapsed > 0 else 0.0:.1f} files/s written",
        ]
        notes = {k: v for k, v in sorted(self.counts.items()) if k.startswith("note:")}
        if notes:
            lines.append("conversions: " + ", ".join(f"{k[5:]} {v}" for k, v in notes.items()))
        for path, reason in self.failures[:FAILURES_SHOWN]:
            lines.append(f"  failed: {path}: {reason}")
        if len(self.failures) > FAILURES_SHOWN:
            lines.append(f"  ... and {len(self.failures) - FAILURES_SHOWN} more failures")
        return "\n".join(lines)


@dataclass
class EncodedItem:
    source: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


class CacheBuilder(Protocol):
    def expected_metadata(self, source: str) -> dict[str, str]:
        """What a fresh sidecar of ``source`` holds in its metadata. Raises OSError/ValueError for a bad source."""

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        """Encode ``sources`` in batches; report the ones that fail to ``summary`` and yield the rest."""


def process_shard() -> tuple[int, int]:
    """This process's (rank, world size) when started by torchrun or accelerate launch, else (0, 1)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return rank, world


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N), checked; None -> (0, 1). Combined with the process rank by ``effective_shard``."""
    if not text:
        return 0, 1
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard wants I/N such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return index, count


def effective_shard(machine_shard: tuple[int, int]) -> tuple[int, int]:
    """Combine --shard (across machines) with the process rank (within one): disjoint, covering."""
    machine_index, machine_count = machine_shard
    rank, world = process_shard()
    return machine_index * world + rank, machine_count * world


def take_shard(items: list[str], shard_index: int, shard_count: int) -> list[str]:
    return items[shard_index::shard_count]


def collect_sources(roots: Iterable[str], extensions: tuple[str, ...]) -> list[str]:
    sources: list[str] = []
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root not found: {root}")
        sources.extend(walk_files(root, extensions))
    return sources


def plan(builder: CacheBuilder, sources: list[str], settings: CacheSettings, summary: CacheSummary) -> list[str]:
    """The sources whose sidecar must be (re)built; counts the fresh and legacy ones it skips."""
    todo = []
    for source in sources:
        target = sidecar_path(source, settings.out_suffix)
        try:
            expected = builder.expected_metadata(source)
        except (OSError, ValueError) as error:
            summary.fail(source, str(error))
            continue
        state = Freshness("missing") if settings.overwrite else check_freshness(target, expected)
        if state.status == "fresh":
            summary.count("fresh")
        elif state.status == "legacy":
            summary.count("legacy")
        else:
            if state.status in ("stale", "unreadable"):
                summary.count("stale")
            todo.append(source)
    return todo


class BackgroundWriter:
    """Writes sidecars on a thread so the encoder does not wait for the disk."""

    def __init__(self, summary: CacheSummary, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sidecar-writer")
        self._pending: list[tuple[str, Future]] = []
        self._summary = summary
        self._max_pending = max_pending

    def submit(self, target: str, item: EncodedItem) -> None:
        self._pending.append((item.source, self._pool.submit(write_sidecar, target, item.tensors, item.metadata)))
        if len(self._pending) >= self._max_pending:
            self._collect(wait_for=len(self._pending) // 2)

    def _collect(self, wait_for: int) -> None:
        done, self._pending = self._pending[:wait_for], self._pending[wait_for:]
        for source, future in done:
            try:
                future.result()
                self._summary.count("written")
            except OSError as error:
                self._summary.fail(source, f"could not write sidecar: {error}")

    def close(self) -> None:
        self._collect(wait_for=len(self._pending))
        self._pool.shutdown(wait=True)


def run_cache_build(builder: CacheBuilder, settings: CacheSettings) -> CacheSummary:
    summary = CacheSummary(report_path=settings.report_path)
    sources = collect_sources(settings.data_roots, settings.extensions)
    sources = take_shard(sources, settings.shard_index, settings.shard_count)
    todo = plan(builder, sources, settings, summary)
    writer = BackgroundWriter(summary)
    progress = tqdm(total=len(todo), unit="file", desc=f"caching {settings.out_suffix}",
                    disable=not settings.show_progress, dynamic_ncols=True)
    try:
        for item in builder.encode(todo, summary):
            writer.submit(os.fspath(sidecar_path(item.source, settings.out_suffix)), item)
            progress.update(1)
    finally:
        writer.close()
        progress.close()
    return summary


def add_common_cache_flags(parser, default_batch: int) -> None:
    """Flags every cache script takes, with the seed's names."""
    parser.add_argument("--data_root", nargs="+", required=True, action="extend",
                        help="one or more folders to walk (repeatable)")
    parser.add_argument("--batch_size", type=int, default=default_batch, help="items encoded at once")
    parser.add_argument("--overwrite", action="store_true", help="rebuild every sidecar, fresh or not")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes that read and decode the inputs")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="encoder precision: bfloat16 (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--save_dtype", default="float16", help="precision stored in the sidecars")
    parser.add_argument("--shard", default=None, help="I/N: take the I-th of N disjoint shares of the files")
    parser.add_argument("--report", default=None, help="write one JSON line per failed file here")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
