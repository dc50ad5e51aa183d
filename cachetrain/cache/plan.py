"""What a cache build must do: walk the roots, find name clashes and orphans, skip fresh sidecars.

1. one walk per data root (os.scandir, case-insensitive extensions) finds the sources, the existing
   sidecars and temporaries left by killed writers;
2. a source whose sidecar is fresh (metadata matches source and encoder) is skipped; stale or
   unreadable ones are rebuilt; legacy ones (no metadata) are kept unless ``--overwrite``. An image
   whose modification time alone changed (copied without keeping times) is read and compared by
   content: the same bytes keep their sidecar, which then stores the new time;
3. sidecars whose source is gone are orphans (removed with ``--prune``); what killed writers left
   is removed.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from .summary import FAILURES_SHOWN, CacheSummary, write_problem_kind
from ..freshness import Freshness, check_freshness
from ..sidecar import (DEFAULT_IMAGE_EXTENSIONS, SidecarError, is_abandoned_temporary_content, is_orphan,
                      is_source_image, sidecar_path, sidecar_sources, update_metadata)
from ..fresh_digests import FreshnessRecord, freshness_digest
from ..tree import walk_files

# Freshness checks run on this many threads, this many files per task.
PLAN_THREADS = 8
PLAN_CHUNK = 512
# A temporary sidecar this old belongs to a writer that died (a live one renames it within ms).
TEMPORARY_GRACE_SECONDS = 60.0
FRESH_BY_INDEX = Freshness("fresh", "by the data index's fresh digest")


@dataclass
class TreeScan:
    sources: list[str]  # every input, in walk order (the same in every process)
    sidecars: list[str]  # existing sidecars with the run's suffix
    temporaries: list[str]  # temporary sidecars of killed writers
    other_images: list[str]  # images with extensions this run was told to leave alone


def scan_roots(roots: Iterable[str], extensions: tuple[str, ...], out_suffix: str,
               should_stop: Callable[[], bool] = lambda: False) -> TreeScan:
    """One walk per root finds the sources and the existing sidecars together.

    Images of the default extensions that ``extensions`` leaves out are found too: their sidecars
    are not orphans just because this run does not cache them. When ``should_stop()`` turns true (a
    stop signal) the walk ends where it is, with what it found so far.
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
            if should_stop():
                return scan
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


def find_orphans(sidecars: list[str], images: list[str], out_suffix: str, extensions: tuple[str, ...]) -> list[str]:
    """Sidecars with no source of the same stem beside them (sidecar.is_orphan, the inspector's rule too)."""
    sources = sidecar_sources(images, out_suffix, extensions)
    return [sidecar for sidecar in sidecars if is_orphan(sidecar, out_suffix, sources)]


def scan_orphans(scan: TreeScan, out_suffix: str) -> list[str]:
    """find_orphans for a scan_roots result, whose sources and other images are source images by the same
    rule already (is_source_image): their stems, without classifying every name a second time."""
    stems = {os.path.splitext(path)[0] for path in scan.sources}
    stems.update(os.path.splitext(path)[0] for path in scan.other_images)
    return [sidecar for sidecar in scan.sidecars if is_orphan(sidecar, out_suffix, stems)]


def plan(sources: list[str], expected_metadata: Callable[[str], dict[str, str]],
         source_digest: Callable[[str], dict[str, str]] | None, out_suffix: str, overwrite: bool,
         summary: CacheSummary, orphans: list[str] | None = None, verify: bool = False,
         record: FreshnessRecord | None = None, should_stop: Callable[[], bool] = lambda: False) -> list[str]:
    """The sources whose sidecar must be (re)built; counts the fresh and legacy ones it skips.

    ``expected_metadata`` and ``source_digest`` are the builder's (see cache_build.CacheBuilder).
    A source the builder cannot use is reported; if its problem means the sidecar's source is gone
    (a deleted caption), the existing sidecar is added to ``orphans``. The checks (a stat and a
    header read per file) run on threads: on network storage each is a round trip. ``verify`` (--verify)
    also hashes every source whose sidecar looks fresh: a read of every byte, for content swapped under the
    same size and modification time. ``record`` (fresh_digests.FreshnessRecord): a sidecar that the data
    index recorded fresh for the same expected metadata, at the size and mtime it has now, is fresh without
    its header being read; the ones found fresh by reading are learned, and the due ones' expected keys
    kept (``record.expected_keys``), so the run's end can record them too. Not used with ``verify``.
    When ``should_stop()`` turns true (a stop signal) the sources not checked yet are passed over: the
    caller discards the plan.
    """
    record = None if verify or overwrite else record

    def check(source: str) -> tuple[str, Exception | None, Freshness | None, str]:
        """(source, its problem, its sidecar's freshness, a note for the summary); runs on a thread."""
        try:
            expected = expected_metadata(source)
        except (OSError, ValueError) as error:
            return source, error, None, ""
        target = os.path.splitext(source)[0] + out_suffix  # sidecar_path's rule, without a Path per file
        if overwrite:
            return source, None, Freshness("missing"), ""
        digest = None
        if record is not None:
            digest = freshness_digest(expected)
            if record.is_fresh(target, digest):
                return source, None, FRESH_BY_INDEX, ""
            try:
                before = os.stat(target)
            except OSError:
                before = None
        state = check_freshness(target, expected, functools.partial(source_digest, source) if source_digest else None,
                                verify=verify)
        if record is not None:
            if state.status == "fresh" and before is not None:
                try:  # learned only when the file read is the one stat'ed (not replaced meanwhile)
                    after = os.stat(target)
                    if (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns,
                                                                            before.st_ino):
                        record.learn(target, digest, after)
                except OSError:
                    pass
            elif state.status != "legacy":
                record.expect(source, expected)
        if state.status == "retimed":  # store the new time, so the next run needs only a stat again
            try:
                update_metadata(target, {key: value for key, value in expected.items() if value is not None})
            except (OSError, SidecarError) as error:  # e.g. a read-only cache: the latent is still right
                return source, None, state, f"same bytes, but the new modification time was not stored: {error}"
        return source, None, state, ""

    def check_chunk(chunk: list[str]) -> list[tuple[str, Exception | None, Freshness | None, str]]:
        return [check(source) for source in chunk if not should_stop()]

    todo = []
    chunks = (sources[i : i + PLAN_CHUNK] for i in range(0, len(sources), PLAN_CHUNK))
    with ThreadPoolExecutor(max_workers=PLAN_THREADS, thread_name_prefix="freshness") as pool:
        # map() keeps the order; chunks keep the number of futures small for millions of files.
        for results in pool.map(check_chunk, chunks):
            if should_stop():  # stopping: the checks cut short decide nothing
                break
            for source, error, state, note in results:
                if note:
                    summary.time_not_stored(source, note)
                if error is not None:
                    summary.fail(source, getattr(error, "kind", "unreadable"), str(error))
                    target = sidecar_path(source, out_suffix)
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
