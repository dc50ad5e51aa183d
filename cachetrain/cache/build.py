"""The cache builders' one engine: its settings, what a builder provides, the run in order, the common flags.

A builder (image_cache.ImageLatentBuilder, text_cache.TextEmbeddingBuilder) says what a fresh
sidecar's metadata must hold and how to encode a batch. ``run_cache_build`` does everything else
the same way for all of them:

1. walk the data roots once and plan (cache_plan): sources, existing sidecars, fresh ones skipped;
2. take this process's share (shards): ``--shard I/N`` across machines combined with the torchrun /
   accelerate rank (one launch may span several nodes), so all processes together cover every source
   exactly once;
3. encode in batches (the builder) and write each sidecar atomically on background threads
   (cache_writer);
4. report sidecars whose source is gone (orphans; removed with ``--prune``) and sum up (cache_summary):
   under a launch, once every process has finished, its first process sums up all of them;
5. bring each root's data index up to date (data_index.refresh), in one process only, after all have
   written: the folders written by any process are scanned again, the rest only where their mtime
   changed, so the trainer starts from the index.

The flags every cache script shares, and the settings made from them, are here too.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

from .plan import drop_name_clashes, handle_orphans, plan, scan_orphans, scan_roots
from .stop import FINISHING, UPDATING_INDEX, CacheStopNow, CacheStopSignal
from .summary import CacheSummary, handled_count
from .writer import BackgroundWriter, EncodedItem
from .shares import effective_shard, gather_from_processes, parse_shard, per_process_path, process_shard, take_shard
from ..bounded_read import DEFAULT_READ_TIMEOUT, set_read_timeout
from ..data_index import refresh
from ..fresh_digests import FreshnessRecord, record_fresh_digests
from ..sidecar import CAPTION_EXTENSION, DEFAULT_IMAGE_EXTENSIONS, sidecar_path
from ..tree import normalize_extensions


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
    verify: bool = False  # hash every source whose sidecar looks fresh (same size and mtime)


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


def run_cache_build(builder: CacheBuilder, settings: CacheSettings) -> CacheSummary:
    """Bring every source's sidecar up to date (this process's share of them) and sum up."""
    summary = CacheSummary(report_path=settings.report_path)
    if settings.report_path:
        open(settings.report_path, "w").close()  # a report describes one run
    record = FreshnessRecord(settings.data_roots, settings.out_suffix)
    todo, encoded, writer = [], None, None
    stopped, stopped_at_once, handled_before, not_attempted = None, False, 0, 0
    # one catcher from the walk to the data index: a signal anywhere in the build is its first or its second,
    # never met by the default handlers (a traceback, or a kill that leaves no summary)
    with CacheStopSignal() as stop:
        try:
            try:
                todo, not_attempted = _plan_build(builder, settings, summary, stop, record)
                if stop.requested:  # before any encoding: nothing was written
                    stopped = f"{stop.requested} received while {stop.phase}"
                else:
                    stop.phase = None
                    writer = BackgroundWriter(summary, on_written=record.written)
                    summary.progress = tqdm(total=len(todo), unit="file", desc=f"caching {settings.out_suffix}",
                                            disable=not settings.show_progress, dynamic_ncols=True, file=sys.stderr)
                    handled_before = handled_count(summary)
                    encoded = builder.encode(todo, summary)
                    for item in encoded:
                        writer.submit(os.fspath(sidecar_path(item.source, settings.out_suffix)), item)
                        if writer.stop_reason or stop.requested:
                            stopped = writer.stop_reason or f"{stop.requested} received"
                            break
            except CacheStopNow as signal_name:
                stop.interruptible = False
                stopped, stopped_at_once = f"{signal_name} received twice, stopped at once", True
                if writer is None:  # still walking or checking: what was found and not decided
                    not_attempted = stop.found - (_decided(summary) - stop.decided_before)
        finally:
            stop.interruptible, stop.phase = False, FINISHING  # queued writes finish, decoders end: never halfway
            if hasattr(encoded, "close"):
                encoded.close()  # a generator: ends its decode workers when the loop ended early
            if writer is not None:
                writer.close()
            if summary.progress is not None:
                summary.progress.close()
                summary.progress = None
        if stop.again and not stopped_at_once:  # the second signal came while the writes finished
            stopped, stopped_at_once = f"{stop.again} received twice, stopped at once", True
        if stopped:
            if writer is not None:
                not_attempted = len(todo) - (handled_count(summary) - handled_before)
            summary.stop(stopped, not_attempted)
        written_folders = {os.path.dirname(os.path.abspath(source)) for source in todo} if writer is not None else set()
        learned = record.learned
        # a stop before encoding or a second signal: no index is written now (nothing new was written)
        index_now = writer is not None and not stopped_at_once
        shares = gather_from_processes((summary.share(), sorted(written_folders), index_now, learned))
        if shares is not None:  # a launch: every process has finished writing; its first sums up
            rank, processes = process_shard()
            summary.process = (rank, processes)
            for other, (share, folders, other_index_now, digests) in enumerate(shares):
                written_folders.update(folders)
                index_now = index_now and other_index_now
                if other != rank:
                    learned.update(digests)
                if rank == 0 and other != 0:
                    summary.add_share(share)
        if stop.again and not stopped_at_once:  # the second signal came while the launch summed up
            _index_left(stop.again)
            index_now = False
        # one writer of each index, once every process of the launch has written (another --shard's folders
        # are found changed later)
        if settings.shard_index == 0 and index_now:
            stop.phase, stop.interruptible = UPDATING_INDEX, True
            try:
                update_data_indexes(settings, written_folders, learned)
            except CacheStopNow as signal_name:
                stop.interruptible = False
                _index_left(str(signal_name))
    return summary


def _index_left(signal_name: str) -> None:
    print(f"[cache] {signal_name} received twice: the data index was left as it was (the next start walks the "
          "folders that changed)", file=sys.stderr)


def _plan_build(builder: CacheBuilder, settings: CacheSettings, summary: CacheSummary,
                stop: CacheStopSignal, record: FreshnessRecord) -> tuple[list[str], int]:
    """The walk, the freshness checks and the orphans: (the sources to encode, 0). Stopped by a first signal:
    ([], how many files found were left undecided), nothing written or removed."""
    scan = scan_roots(settings.data_roots, settings.extensions, settings.out_suffix, stop.should_stop)
    all_sources = drop_name_clashes(scan.sources, summary if settings.shard_index == 0 else None)
    sources = take_shard(all_sources, settings.shard_index, settings.shard_count)
    stop.found, stop.decided_before = len(sources), _decided(summary)
    if stop.requested:
        return [], len(sources)
    stop.phase = "checking which sidecars are fresh"
    # Orphans are a property of the whole tree: one process (shard 0) reports and prunes them.
    orphans = []
    if settings.shard_index == 0:
        orphans = scan_orphans(scan, settings.out_suffix)
    todo = plan(sources, builder.expected_metadata, getattr(builder, "source_digest", None), settings.out_suffix,
                settings.overwrite, summary, orphans, verify=settings.verify, record=record,
                should_stop=stop.should_stop)
    if stop.requested:
        return [], len(sources) - (_decided(summary) - stop.decided_before)
    handle_orphans(orphans, scan.temporaries if settings.shard_index == 0 else [], settings.prune, summary)
    return todo, 0


def _decided(summary: CacheSummary) -> int:
    """Sources whose outcome the freshness checks settled (fresh, legacy kept, or failed)."""
    return summary.counts["fresh"] + summary.counts["legacy"] + summary.counts["failed"]


def update_data_indexes(settings: CacheSettings, written_folders: set[str],
                        fresh: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Refresh the data index of every root, with the fresh digests learned (``fresh``: sidecar path ->
    (size, mtime_ns, digest); fresh_digests). A failure is reported in one line: the sidecars are written,
    and a start without an index walks the tree as before."""
    for root in settings.data_roots:
        progress = tqdm(unit="folder", desc=f"indexing {root}", disable=not settings.show_progress,
                        dynamic_ncols=True, file=sys.stderr)
        try:
            done = refresh(root, written_folders, suffixes=(settings.out_suffix,), progress=progress,
                           amend=functools.partial(record_fresh_digests, suffix=settings.out_suffix,
                                                   digests=fresh or {}))
        except OSError as error:
            print(f"[cache] data index of {root} not updated: {error}", file=sys.stderr)
            continue
        finally:
            progress.close()
        if done.write_error:
            print(f"[cache] data index of {root} not written: {done.write_error}", file=sys.stderr)


def int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``; anything else is refused at parse time in one line
    ("argument --batch_size: 0: must be an integer >= 1"), before a model loads."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def out_suffix_problem(out_suffix: str, extensions, caption_suffix: str = CAPTION_EXTENSION) -> str | None:
    """Why ``out_suffix`` cannot name sidecars (None when it can): the one rule for every cache script.

    x.jpg's sidecar is x<out_suffix>, and the walk takes every name ending in it for a sidecar (an orphan
    when no source is beside it, deleted by --prune). So the suffix must start with "." and be more than
    that, and must not be an image extension (the script's, --extensions, or a common one) or the caption
    suffix: such a sidecar would overwrite the user's images or captions, and --prune would delete them.
    """
    if not out_suffix.startswith(".") or out_suffix == ".":
        return "must start with '.' and name the sidecars (such as .img_sdvae); x.jpg -> x<out_suffix>"
    lowered = out_suffix.lower()
    images = set(normalize_extensions([*DEFAULT_IMAGE_EXTENSIONS, *extensions]))
    if lowered in images:
        return "is an image extension: the sidecars would overwrite images (and --prune delete them)"
    captions = {CAPTION_EXTENSION, caption_suffix.lower()}
    if lowered in captions:
        return "is the caption suffix: the sidecars would overwrite captions (and --prune delete them)"
    return None


def check_cache_flags(parser, args) -> None:
    """The checks of the common flags that take several flags together, made right after parsing (before any
    model loads): a bad --out_suffix ends the run with one line and exit status 2."""
    problem = out_suffix_problem(args.out_suffix, getattr(args, "extensions", ()),
                                 getattr(args, "caption_suffix", CAPTION_EXTENSION))
    if problem:
        parser.error(f"--out_suffix {args.out_suffix!r}: {problem}")


def add_common_cache_flags(parser, default_batch: int, encoder_dtype_help: str | None = None) -> None:
    """Flags every cache script takes, with the seed's names."""
    parser.add_argument("--data_root", nargs="+", required=True, action="extend",
                        help="one or more folders to walk (repeatable)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=default_batch, help="items encoded at once")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild every sidecar, fresh or legacy (by default fresh ones are skipped, "
                             "stale and unreadable ones rebuilt, legacy ones without metadata kept)")
    parser.add_argument("--prune", action="store_true",
                        help="remove sidecars whose source is gone and temporaries left by killed runs")
    parser.add_argument("--num_workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes that read and decode the inputs")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1 or cpu (default: this process's GPU when CUDA is available)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available (--device cpu)")
    parser.add_argument("--dtype", default=None,
                        help=encoder_dtype_help or "encoder precision: bfloat16 (default on CUDA) or float32 (default on CPU)")
    parser.add_argument("--save_dtype", default="float16",
                        help="precision stored in the sidecars (the original scripts store float32; float16 halves "
                             "the cache and moves a latent by at most 0.2%% of its std, decoded 84-87 dB PSNR "
                             "from float32: docs/BENCHMARKS.md)")
    parser.add_argument("--shard", default=None,
                        help="I/N: take the I-th of N disjoint shares of the files (one per machine); "
                             "under torchrun / accelerate launch each process then takes its part of that share")
    parser.add_argument("--report", default=None,
                        help="write one JSON line per problem here (path, status, kind, reason); "
                             "processes of one launch add .rankR to the name")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--verify", action="store_true",
                        help="read and hash every image whose sidecar looks fresh (same size and modification "
                             "time) and rebuild those whose bytes changed; reads the whole dataset")
    parser.add_argument("--read_timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                        help="seconds one file's read may take before the file is named and passed over (a hung "
                             "network or FUSE mount; 0: no bound; default %(default)g)")


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


def requested_device(args) -> str | None:
    """--device, or "cpu" for --cpu (the original scripts' flag); ValueError when they disagree."""
    if getattr(args, "cpu", False):
        if args.device and torch.device(args.device).type != "cpu":
            raise ValueError(f"--cpu and --device {args.device}: choose one")
        return "cpu"
    return args.device


def default_encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fast, no fp16 overflow), fp32 on CPU (bf16 has no fast CPU kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def settings_from_args(args, extensions: tuple[str, ...], num_workers: int) -> CacheSettings:
    """The engine's settings from the common flags (the same for every cache script)."""
    caption_suffix = getattr(args, "caption_suffix", CAPTION_EXTENSION)
    problem = out_suffix_problem(args.out_suffix, extensions, caption_suffix)
    if problem:
        raise ValueError(f"--out_suffix {args.out_suffix!r}: {problem}")
    for extension in extensions:
        if extension in (CAPTION_EXTENSION, caption_suffix.lower(), args.out_suffix.lower()):
            raise ValueError(f"--extensions {extension}: captions and sidecars cannot be sources")
    if caption_suffix.lower() in ("", args.out_suffix.lower(), *extensions):
        raise ValueError(f"--caption_suffix {caption_suffix!r}: would name an image or the sidecar itself")
    for root in args.data_root:
        if not os.path.isdir(root):
            raise ValueError(f"--data_root {root}: no such folder")
    read_timeout = getattr(args, "read_timeout", DEFAULT_READ_TIMEOUT)
    if not read_timeout >= 0 or read_timeout == float("inf"):
        raise ValueError(f"--read_timeout {read_timeout}: must be a finite number of seconds >= 0 (0: no bound)")
    set_read_timeout(read_timeout)  # every read of this process and of its DataLoader workers
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
                         prune=args.prune, verify=getattr(args, "verify", False))
