"""Writing what the builders encode: each sidecar (and a preview beside it) atomically, on background threads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..atomic import write_atomically
from .summary import CacheSummary, write_problem, write_problem_kind
from ..sidecar import FILE_MODE, write_sidecar

# This many sidecar writes in a row failing for a full disk stop the run (see BackgroundWriter)
DISK_FULL_STOP = 32


@dataclass
class EncodedItem:
    source: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    extra_files: dict[str, bytes] = field(default_factory=dict)  # written beside the sidecar (previews)


class ExtraFileFailed(Exception):
    """The sidecar was written; a file asked for beside it (a preview) was not."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(str(cause))
        self.path = path
        self.cause = cause


def write_item(target: str, item: EncodedItem) -> None:
    """The sidecar, then the files beside it (each written once, atomically, without fsync: see write_sidecar)."""
    write_sidecar(target, item.tensors, item.metadata)
    for path, data in item.extra_files.items():
        try:
            write_atomically(path, data, mode=FILE_MODE, fsync=False)
        except Exception as error:
            raise ExtraFileFailed(path, error) from error


class BackgroundWriter:
    """Writes sidecars on threads so the encoder does not wait for the disk.

    At most ``max_pending`` writes are in flight: a slow disk slows the run rather than filling
    memory with encoded tensors. After ``DISK_FULL_STOP`` writes in a row failed for a full disk,
    ``stop_reason`` says so and the run stops encoding: hours of work would all be thrown away.
    """

    def __init__(self, summary: CacheSummary, max_pending: int = 64,
                 on_written: Callable[[str, str, dict], None] | None = None):
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sidecar-writer")
        self._pending: list[tuple[str, str, Future, dict]] = []
        self._on_written = on_written  # (source, sidecar, its metadata) of each sidecar written
        self._summary = summary
        self._max_pending = max_pending
        self._disk_full_in_a_row = 0
        self.stop_reason = ""

    def submit(self, target: str, item: EncodedItem) -> None:
        self._pending.append((item.source, target, self._pool.submit(write_item, target, item), item.metadata))
        if len(self._pending) >= self._max_pending:
            self._collect(wait_for=len(self._pending) // 2)
        else:  # take what is done already, so a full disk is noticed early
            finished = 0
            while finished < len(self._pending) and self._pending[finished][2].done():
                finished += 1
            self._collect(wait_for=finished)

    def _collect(self, wait_for: int) -> None:
        done, self._pending = self._pending[:wait_for], self._pending[wait_for:]
        for source, target, future, metadata in done:
            try:
                future.result()
            except ExtraFileFailed as error:  # the sidecar is there and counts as written
                self._summary.count("written")
                self._summary.count("extra_files_failed")
                self._summary.fail(source, write_problem_kind(error.cause),
                                   f"sidecar written, but {write_problem(error.path, error.cause)[1]}")
                continue
            except Exception as error:  # disk full, read-only, safetensors' own error: counted, never fatal
                kind, reason = write_problem(target, error)
                self._summary.fail(source, kind, reason)
                self._disk_full_in_a_row = self._disk_full_in_a_row + 1 if kind == "disk full" else 0
                if self._disk_full_in_a_row >= DISK_FULL_STOP and not self.stop_reason:
                    self.stop_reason = f"the disk is full ({DISK_FULL_STOP} sidecar writes in a row failed)"
                continue
            self._disk_full_in_a_row = 0
            if self._on_written is not None:
                self._on_written(source, target, metadata)
            self._summary.count("written")
            if self._summary.progress is not None:
                self._summary.progress.update(1)

    def close(self) -> None:
        self._collect(wait_for=len(self._pending))
        self._pool.shutdown(wait=True)
