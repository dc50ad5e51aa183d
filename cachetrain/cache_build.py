"""What the cache builders share: walk, shard, skip fresh sidecars, batch, write, summarise.

A builder (image_cache.ImageLatentBuilder, text_cache.TextEmbeddingBuilder) says what a fresh
sidecar's metadata must hold and how to encode a batch. ``run_cache_build`` does everything else
the same way for all of them:

1. walk the data roots once (os.scandir, case-insensitive extensions), finding the sources, the
   existing sidecars and temporaries left by killed writers;
2. take this process's share: ``--shard I/N`` across machines combined with the torchrun /
   accelerate rank, so all processes together cover every source exactly once;
3. plan: a source whose sidecar is fresh (metadata matches source and encoder) is skipped; stale
   or unreadable ones are rebuilt; legacy ones (no metadata) are kept unless ``--overwrite``. An
   image whose modification time alone changed (copied without keeping times) is read and
   compared by content: the same bytes keep their sidecar, which then stores the new time;
4. encode in batches and write each sidecar atomically on background threads;
5. report sidecars whose source is gone (orphans; removed with ``--prune``) and sum up.

Every input that gets no sidecar is reported with its path, a kind and a reason, counted, and the
run goes on. The exit status is 0 only when every input has a usable sidecar: fresh, or legacy
kept on purpose. Sources skipped on request (``--min_size``) do not count against it.
"""

from __future__ import annotations

import errno
import functools
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

from .shards import effective_shard, parse_shard, per_process_path, take_shard
from .atomic import write_atomically
from .sidecar import (CAPTION_EXTENSION, FILE_MODE, Freshness, SidecarError, check_freshness,
                      is_abandoned_temporary_content, is_source_image, sidecar_path, update_metadata, write_sidecar)
from .tree import DEFAULT_IMAGE_EXTENSIONS, walk_files

FAILURES_SHOWN = 5  # in the summary
FAILURES_PRINTED = 100  # as they happen; a run over millions of broken files must not flood the log
# Freshness checks run on this many threads, this many files per task.
PLAN_THREADS = 8
PLAN_CHUNK = 512
# This many sidecar writes in a row failing for a full disk stop the run (see BackgroundWriter)
DISK_FULL_STOP = 32
# A temporary sidecar this old belongs to a writer that died (a live one renames it within ms).
TEMPORARY_GRACE_SECONDS = 60.0
# Problems that remove an input on the user's request (reported and counted, but not a failure).
REQUESTED_SKIPS = ("too small",)


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
    prune: bool = False


@dataclass
class CacheSummary:
    """What a run did: counts by outcome, failures by kind, conversions, and the first few reasons.

    Every problem with an input is also written as one JSON line to ``report_path`` (if set):
    {"path", "status": "failed" | "skipped" | "note" | "orphan", "kind", "reason"}.
    """

    counts: Counter = field(default_factory=Counter)
    failure_kinds: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first FAILURES_SHOWN
    report_path: str | None = None
    stop_reason: str = ""  # why the run stopped before encoding everything ("" when it did not)
    started: float = field(default_factory=time.monotonic)
    progress: tqdm | None = None

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def fail(self, path: str, kind: str, reason: str) -> None:
        """An input that gets no sidecar: printed at once, counted by kind, and written to the report."""
        status = "skipped" if kind in REQUESTED_SKIPS else "failed"
        self.counts[status] += 1
        self.failure_kinds[kind] += 1
        if status == "failed":
            failed = self.counts["failed"]
            if failed <= FAILURES_SHOWN:
                self.failures.append((path, f"{kind}: {reason}"))
            if failed <= FAILURES_PRINTED:
                tqdm.write(f"[cache] failed {path}: {kind}: {reason}", file=sys.stderr)
            elif failed == FAILURES_PRINTED + 1:
                tqdm.write("[cache] more failures: counted and reported (--report), no longer printed", file=sys.stderr)
        self._report(path, status, kind, reason)
        if self.progress is not None:
            self.progress.update(1)

    def note(self, path: str, kind: str, reason: str = "") -> None:
        """An input that got its sidecar after a conversion worth knowing about (upscaled, truncated, ...)."""
        self.notes[kind] += 1
        self._report(path, "note", kind, reason)

    def time_not_stored(self, path: str, reason: str) -> None:
        """A sidecar found fresh by content whose new modification time could not be written into it."""
        self.counts["time_not_stored"] += 1
        self._report(path, "note", "modification time not stored", reason)

    def report_orphan(self, path: str, removed: bool) -> None:
        """A sidecar whose source is gone (written to the report; counted by handle_orphans)."""
        self._report(path, "orphan", "source gone", "removed (--prune)" if removed else "kept; --prune removes it")

    def _report(self, path: str, status: str, kind: str, reason: str) -> None:
        if self.report_path:
            # One write() per line in append mode: lines from concurrent processes never interleave.
            line = json.dumps({"path": path, "status": status, "kind": kind, "reason": reason}) + "\n"
            try:
                with open(self.report_path, "a", encoding="utf-8") as report:
                    report.write(line)
            except OSError as error:  # the report is a copy of what is counted here: the run goes on
                if not self.counts["report_lines_lost"]:
                    tqdm.write(f"[cache] cannot add to the report {self.report_path}: {error}", file=sys.stderr)
                self.counts["report_lines_lost"] += 1

    def stop(self, reason: str, not_attempted: int) -> None:
        """The run stopped before encoding everything (a full disk)."""
        self.stop_reason = reason
        self.counts["not_attempted"] += not_attempted
        tqdm.write(f"[cache] stopped: {reason}; {not_attempted} files not attempted", file=sys.stderr)

    @property
    def ok(self) -> bool:
        """True when every input has a usable sidecar (fresh, or legacy kept on purpose)."""
        return self.counts["failed"] == 0 and not self.stop_reason

    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def render(self) -> str:
        elapsed = time.monotonic() - self.started
        c = self.counts
        handled = c["written"] + c["failed"] + c["skipped"]
        lines = [
            f"written {c['written']} (rebuilt stale {c['stale']}), skipped fresh {c['fresh']}, "
            f"legacy kept {c['legacy']}, failed {c['failed']}, skipped on request {c['skipped']}",
            f"elapsed {elapsed:.1f} s; {handled / elapsed if elapsed > 0 else 0.0:.1f} files/s encoded or rejected, "
            f"{(handled + c['fresh'] + c['legacy']) / elapsed if elapsed > 0 else 0.0:.1f} files/s in all",
        ]
        if c["retimed"]:
            unstored = (f"; {c['time_not_stored']} could not store it and will be read again next run"
                        if c["time_not_stored"] else "")
            lines.append(f"fresh by content {c['retimed']}: new modification time, same bytes (the new time is "
                         f"stored in the sidecar{unstored})")
        if c["orphans"]:
            lines.append(f"orphan sidecars (source gone) {c['orphans']}, removed {c['pruned']}"
                         + ("" if c["pruned"] else " (use --prune to remove)"))
        if c["temporaries"]:
            kept = c["temporaries"] - c["temporaries_removed"]
            lines.append(f"leftover temporaries of killed writers {c['temporaries']}, removed "
                         f"{c['temporaries_removed']}" + (f" ({kept} could not be removed)" if kept else ""))
        if c["report_lines_lost"]:
            lines.append(f"report lines that could not be written to {self.report_path}: {c['report_lines_lost']}")
        if self.stop_reason:
            lines.append(f"stopped early: {self.stop_reason}; {c['not_attempted']} files not attempted "
                         "(make room and run again: what was written is kept)")
        if self.failure_kinds:
            lines.append("problems: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failure_kinds.items())))
        if self.notes:
            lines.append("conversions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items())))
        for path, reason in self.failures:
            lines.append(f"  failed: {path}: {reason}")
        if c["failed"] > len(self.failures):
            lines.append(f"  ... and {c['failed'] - len(self.failures)} more failures"
                         + (f" (all in {self.report_path})" if self.report_path else " (--report FILE lists them all)"))
        return "\n".join(lines)


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


class CacheBuilder(Protocol):
    def expected_metadata(self, source: str) -> dict[str, str]:
        """What a fresh sidecar of ``source`` holds in its metadata (called from several threads at once).

        Raises OSError/ValueError for a bad source; an exception with a ``kind`` attribute names the
        problem's kind, and one with ``source_gone = True`` marks an existing sidecar as an orphan.
        """

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        """Encode ``sources`` in batches; report the ones that fail to ``summary`` and yield the rest."""

    # Optional: ``source_digest(source) -> {"source_sha256": ...}`` for a builder whose source identity
    # includes a modification time; when only that time differs, plan() compares content instead.


# ---------------------------------------------------------------------------------------------
# Walk and plan


@dataclass
class TreeScan:
    sources: list[str]  # every input, in walk order (the same in every process)
    sidecars: list[str]  # existing sidecars with the run's suffix
    temporaries: list[str]  # temporary sidecars of killed writers
    other_images: list[str]  # images with extensions this run was told to leave alone


def scan_roots(roots: Iterable[str], extensions: tuple[str, ...], out_suffix: str) -> TreeScan:
    """One walk per root finds the sources and the existing sidecars together.

    Images of the default extensions that ``extensions`` leaves out are found too: their sidecars
    are not orphans just because this run does not cache them.
    """
    scan = TreeScan([], [], [], [])
    out_suffix_lower = out_suffix.lower()
    wanted = tuple(e.lower() for e in extensions)
    walked: set = set()  # shared by the roots' walks: a folder inside two roots is scanned once
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root not found: {root}")
        for path in walk_files(root, (*extensions, *DEFAULT_IMAGE_EXTENSIONS, out_suffix),
                               temporaries=scan.temporaries, visited=walked):
            name = os.path.basename(path)
            if name.lower().endswith(out_suffix_lower):
                scan.sidecars.append(path)
            elif is_source_image(name, wanted, (out_suffix,)):
                scan.sources.append(path)
            elif is_source_image(name, DEFAULT_IMAGE_EXTENSIONS + wanted, (out_suffix,)):
                scan.other_images.append(path)
            # else a file made from a sidecar (x.img_sdvae.webp): neither a source nor an orphan's source
    return scan


def drop_name_clashes(sources: list[str], summary: CacheSummary | None) -> list[str]:
    """x.jpg and x.png in one folder would share one sidecar: keep the first, report the others."""
    owner: dict[str, str] = {}
    kept = []
    for source in sources:
        stem = os.path.splitext(source)[0]
        first = owner.setdefault(stem, source)
        if first is source:
            kept.append(source)
        elif summary is not None:
            summary.fail(source, "name clash", f"shares its sidecar name with {os.path.basename(first)}; rename one")
    return kept


def find_orphans(sidecars: list[str], sources: list[str], out_suffix: str) -> list[str]:
    """Sidecars with no source of the same stem beside them."""
    stems = {os.path.splitext(s)[0] for s in sources}
    return [s for s in sidecars if s[: -len(out_suffix)] not in stems]


def plan(builder: CacheBuilder, sources: list[str], settings: CacheSettings, summary: CacheSummary,
         orphans: list[str] | None = None) -> list[str]:
    """The sources whose sidecar must be (re)built; counts the fresh and legacy ones it skips.

    A source the builder cannot use is reported; if its problem means the sidecar's source is gone
    (a deleted caption), the existing sidecar is added to ``orphans``. The checks (a stat and a
    header read per file) run on threads: on network storage each is a round trip.
    """

    source_digest = getattr(builder, "source_digest", None)  # builders whose identity includes a file time

    def check(source: str) -> tuple[str, Exception | None, Freshness | None, str]:
        """(source, its problem, its sidecar's freshness, a note for the summary); runs on a thread."""
        try:
            expected = builder.expected_metadata(source)
        except (OSError, ValueError) as error:
            return source, error, None, ""
        target = sidecar_path(source, settings.out_suffix)
        if settings.overwrite:
            return source, None, Freshness("missing"), ""
        state = check_freshness(target, expected, functools.partial(source_digest, source) if source_digest else None)
        if state.status == "retimed":  # store the new time, so the next run needs only a stat again
            try:
                update_metadata(target, expected)
            except (OSError, SidecarError) as error:  # e.g. a read-only cache: the latent is still right
                return source, None, state, f"same bytes, but the new modification time was not stored: {error}"
        return source, None, state, ""

    def check_chunk(chunk: list[str]) -> list[tuple[str, Exception | None, Freshness | None, str]]:
        return [check(source) for source in chunk]

    todo = []
    chunks = (sources[i : i + PLAN_CHUNK] for i in range(0, len(sources), PLAN_CHUNK))
    with ThreadPoolExecutor(max_workers=PLAN_THREADS, thread_name_prefix="freshness") as pool:
        # map() keeps the order; chunks keep the number of futures small for millions of files.
        for results in pool.map(check_chunk, chunks):
            for source, error, state, note in results:
                if note:
                    summary.time_not_stored(source, note)
                if error is not None:
                    summary.fail(source, getattr(error, "kind", "unreadable"), str(error))
                    target = sidecar_path(source, settings.out_suffix)
                    if getattr(error, "source_gone", False) and orphans is not None and target.exists():
                        orphans.append(os.fspath(target))
                elif state.status in ("fresh", "retimed"):
                    summary.count("fresh")
                    if state.status == "retimed":
                        summary.count("retimed")
                elif state.status == "legacy":
                    summary.count("legacy")
                else:
                    if state.status in ("stale", "unreadable"):
                        summary.count("stale")
                    todo.append(source)
    return todo


def handle_orphans(orphans: list[str], temporaries: list[str], prune: bool, summary: CacheSummary) -> None:
    """Report sidecars whose source is gone (removed only with --prune), and remove what killed writers left.

    A temporary is taken for a killed writer's only when its name is exactly a writer's (ours or
    safetensors' own ``.tmpXXXXXX``), it is older than a live writer ever holds one, and, for the
    short safetensors-style name a user might also choose, its bytes are empty or a safetensors
    file's start (``sidecar.is_abandoned_temporary_content``): a user's file never matches. Those are
    removed by every run (they are never anyone's data) and counted in the summary.
    """
    summary.count("orphans", len(orphans))
    for orphan in orphans[:FAILURES_SHOWN]:
        tqdm.write(f"[cache] orphan sidecar (source gone): {orphan}", file=sys.stderr)
    for orphan in orphans:
        summary.report_orphan(orphan, removed=prune)
    if prune:
        for path in orphans:
            try:
                os.unlink(path)
                summary.count("pruned")
            except FileNotFoundError:
                pass
            except OSError as error:  # a read-only cache: the orphan stays, and the summary says why
                summary.fail(path, write_problem_kind(error), f"could not remove the orphan: {error}")
    now = time.time()
    for temporary in temporaries:
        try:
            young = now - os.stat(temporary).st_mtime <= TEMPORARY_GRACE_SECONDS
            if young or not is_abandoned_temporary_content(temporary):
                continue
        except FileNotFoundError:  # a live writer renamed it meanwhile
            continue
        summary.count("temporaries")
        try:
            os.unlink(temporary)
            summary.count("temporaries_removed")
        except FileNotFoundError:
            summary.count("temporaries_removed")
        except OSError as error:
            tqdm.write(f"[cache] cannot remove the leftover temporary {temporary}: {error}", file=sys.stderr)


def write_problem_kind(error: BaseException) -> str:
    """The kind a failed write is counted under in the summary."""
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full"
        if error.errno == errno.EROFS:
            return "read-only"
        if error.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
    return "write failed"


def write_problem(target: str, error: BaseException) -> tuple[str, str]:
    """(kind, reason) of a sidecar that could not be written: disk full, read-only, safetensors' own error..."""
    detail = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
    return write_problem_kind(error), f"could not write {os.path.basename(target)}: {detail}"


# ---------------------------------------------------------------------------------------------
# Encode and write


class BackgroundWriter:
    """Writes sidecars on threads so the encoder does not wait for the disk.

    At most ``max_pending`` writes are in flight: a slow disk slows the run rather than filling
    memory with encoded tensors. After ``DISK_FULL_STOP`` writes in a row failed for a full disk,
    ``stop_reason`` says so and the run stops encoding: hours of work would all be thrown away.
    """

    def __init__(self, summary: CacheSummary, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sidecar-writer")
        self._pending: list[tuple[str, str, Future]] = []
        self._summary = summary
        self._max_pending = max_pending
        self._disk_full_in_a_row = 0
        self.stop_reason = ""

    def submit(self, target: str, item: EncodedItem) -> None:
        self._pending.append((item.source, target, self._pool.submit(write_item, target, item)))
        if len(self._pending) >= self._max_pending:
            self._collect(wait_for=len(self._pending) // 2)
        else:  # take what is done already, so a full disk is noticed early
            finished = 0
            while finished < len(self._pending) and self._pending[finished][2].done():
                finished += 1
            self._collect(wait_for=finished)

    def _collect(self, wait_for: int) -> None:
        done, self._pending = self._pending[:wait_for], self._pending[wait_for:]
        for source, target, future in done:
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
            self._summary.count("written")
            if self._summary.progress is not None:
                self._summary.progress.update(1)

    def close(self) -> None:
        self._collect(wait_for=len(self._pending))
        self._pool.shutdown(wait=True)


def handled_count(summary: CacheSummary) -> int:
    """Inputs with an outcome: written, failed or skipped (a preview that failed beside a written sidecar once)."""
    c = summary.counts
    return c["written"] + c["failed"] + c["skipped"] - c["extra_files_failed"]


def run_cache_build(builder: CacheBuilder, settings: CacheSettings) -> CacheSummary:
    """Bring every source's sidecar up to date (this process's share of them) and sum up."""
    summary = CacheSummary(report_path=settings.report_path)
    if settings.report_path:
        open(settings.report_path, "w").close()  # a report describes one run
    scan = scan_roots(settings.data_roots, settings.extensions, settings.out_suffix)
    all_sources = drop_name_clashes(scan.sources, summary if settings.shard_index == 0 else None)
    sources = take_shard(all_sources, settings.shard_index, settings.shard_count)
    # Orphans are a property of the whole tree: one process (shard 0) reports and prunes them.
    orphans = []
    if settings.shard_index == 0:
        orphans = find_orphans(scan.sidecars, scan.sources + scan.other_images, settings.out_suffix)
    todo = plan(builder, sources, settings, summary, orphans)
    handle_orphans(orphans, scan.temporaries if settings.shard_index == 0 else [], settings.prune, summary)
    writer = BackgroundWriter(summary)
    summary.progress = tqdm(total=len(todo), unit="file", desc=f"caching {settings.out_suffix}",
                            disable=not settings.show_progress, dynamic_ncols=True, file=sys.stderr)
    handled_before = handled_count(summary)
    encoded = builder.encode(todo, summary)
    stopped = False
    try:
        for item in encoded:
            writer.submit(os.fspath(sidecar_path(item.source, settings.out_suffix)), item)
            if writer.stop_reason:
                stopped = True
                break
    finally:
        if hasattr(encoded, "close"):
            encoded.close()  # a generator: ends its decode workers when the loop ended early
        writer.close()
        summary.progress.close()
        summary.progress = None
    if stopped:
        summary.stop(writer.stop_reason, len(todo) - (handled_count(summary) - handled_before))
    return summary


# ---------------------------------------------------------------------------------------------
# Command line


def add_common_cache_flags(parser, default_batch: int) -> None:
    """Flags every cache script takes, with the seed's names."""
    parser.add_argument("--data_root", nargs="+", required=True, action="extend",
                        help="one or more folders to walk (repeatable)")
    parser.add_argument("--batch_size", type=int, default=default_batch, help="items encoded at once")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild every sidecar, fresh or legacy (by default fresh ones are skipped, "
                             "stale and unreadable ones rebuilt, legacy ones without metadata kept)")
    parser.add_argument("--prune", action="store_true",
                        help="remove sidecars whose source is gone and temporaries left by killed runs")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes that read and decode the inputs")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1 or cpu (default: this process's GPU when CUDA is available)")
    parser.add_argument("--dtype", default=None,
                        help="encoder precision: bfloat16 (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--save_dtype", default="float16", help="precision stored in the sidecars")
    parser.add_argument("--shard", default=None,
                        help="I/N: take the I-th of N disjoint shares of the files (one per machine); "
                             "under torchrun / accelerate launch each process then takes its part of that share")
    parser.add_argument("--report", default=None,
                        help="write one JSON line per problem here (path, status, kind, reason); "
                             "processes of one launch add .rankR to the name")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")


# What a bare --custom leaves in args.custom: "--model is itself the custom pipeline folder".
CUSTOM_IS_MODEL = True


def add_custom_flag(parser, parts: str) -> None:
    """--custom as the seed's users type it: bare, ``--model`` is a custom pipeline folder; with a folder, that one."""
    parser.add_argument("--custom", "--is_custom", nargs="?", const=CUSTOM_IS_MODEL, default=None, metavar="FOLDER",
                        help=f"the model is a custom pipeline folder (such as an SD1.5+T5 pipeline): take its "
                             f"{parts} from it. Bare --custom means --model is that folder; --custom FOLDER takes "
                             f"them from FOLDER instead of --model")


def custom_model_source(args, needed_subfolders: tuple[str, ...]) -> str:
    """The folder or hub id the parts come from (--custom FOLDER wins over --model); checks a local custom
    folder holds ``needed_subfolders`` and raises ValueError naming the flag otherwise."""
    if args.custom is None:
        return args.model
    folder, flag = (args.model, "--model") if args.custom is CUSTOM_IS_MODEL else (args.custom, "--custom")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: --custom wants a pipeline folder, and this is none")
    for subfolder in needed_subfolders:
        if not os.path.isdir(os.path.join(folder, subfolder)):
            raise ValueError(f"{flag} {folder}: no {subfolder}/ folder in it")
    return folder
def add_single_file_config_flag(parser) -> None:
    """--single_file_config, for the scripts whose --model may be one .safetensors file (SD1.5 / SDXL)."""
    parser.add_argument("--single_file_config", default=None,
                        help="with a single-file --model (.safetensors): the folder or hub id its configs and "
                             "tokenizer come from (default: the script's default model)")


def default_encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fast, no fp16 overflow), fp32 on CPU (bf16 has no fast CPU kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def settings_from_args(args, extensions: tuple[str, ...], num_workers: int) -> CacheSettings:
    """The engine's settings from the common flags (the same for every cache script)."""
    caption_suffix = getattr(args, "caption_suffix", CAPTION_EXTENSION)
    for extension in extensions:
        if extension in (CAPTION_EXTENSION, caption_suffix.lower(), args.out_suffix.lower()):
            raise ValueError(f"--extensions {extension}: captions and sidecars cannot be sources")
    if caption_suffix.lower() in ("", args.out_suffix.lower(), *extensions):
        raise ValueError(f"--caption_suffix {caption_suffix!r}: would name an image or the sidecar itself")
    for root in args.data_root:
        if not os.path.isdir(root):
            raise ValueError(f"--data_root {root}: no such folder")
    report_path = per_process_path(args.report)
    if report_path:
        try:
            open(report_path, "a").close()
        except OSError as error:
            raise ValueError(f"--report {report_path}: cannot write it ({error.strerror or error})") from None
    shard_index, shard_count = effective_shard(parse_shard(args.shard))
    return CacheSettings(data_roots=args.data_root, out_suffix=args.out_suffix, extensions=extensions,
                         batch_size=args.batch_size, overwrite=args.overwrite, num_workers=num_workers,
                         shard_index=shard_index, shard_count=shard_count,
                         report_path=report_path, show_progress=not args.no_progress,
                         prune=args.prune)
