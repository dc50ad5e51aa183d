"""What a cache build reports: counts by outcome, every problem by kind, and the summary at the end.

Every input that gets no sidecar is reported with its path, a kind and a reason, counted, and the
run goes on. The exit status is 0 only when every input has a usable sidecar: fresh, or legacy
kept on purpose. Sources skipped on request (``--min_size``) do not count against it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

FAILURES_SHOWN = 5  # in the summary
FAILURES_PRINTED = 100  # as they happen; a run over millions of broken files must not flood the log
# Problems that remove an input on the user's request (reported and counted, but not a failure).
REQUESTED_SKIPS = ("too small",)


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
    process: tuple[int, int] = (0, 1)  # (rank, processes) of a launch; rank 0 sums up all of them

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

    def share(self) -> dict:
        """What this process counted, to be summed by the launch's first process (``add_share``)."""
        return {"counts": dict(self.counts), "failure_kinds": dict(self.failure_kinds), "notes": dict(self.notes),
                "failures": self.failures, "stop_reason": self.stop_reason}

    def add_share(self, share: dict) -> None:
        """Add another process's ``share()``: counts summed, the first failures kept, a stop kept."""
        self.counts.update(share["counts"])
        self.failure_kinds.update(share["failure_kinds"])
        self.notes.update(share["notes"])
        self.failures.extend(share["failures"][: FAILURES_SHOWN - len(self.failures)])
        self.stop_reason = self.stop_reason or share["stop_reason"]

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
        rank, processes = self.process
        if rank > 0:  # its share only: the launch's first process prints the sum
            return (f"[cache] process {rank} of {processes}: written {c['written']}, skipped fresh {c['fresh']}, "
                    f"failed {c['failed']} (process 0 sums up all {processes})")
        lines = [] if processes == 1 else [f"all {processes} processes of the launch:"]
        lines += [
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


def handled_count(summary: CacheSummary) -> int:
    """Inputs with an outcome: written, failed or skipped (a preview that failed beside a written sidecar once)."""
    c = summary.counts
    return c["written"] + c["failed"] + c["skipped"] - c["extra_files_failed"]


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
