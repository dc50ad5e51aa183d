"""Whether a sidecar is current: the identity of its source (size and modification time, the bytes'
sha256, a caption's text) and of its encoder, as the cache scripts store them in its metadata, and the
rule that compares them with what the source and encoder would write now. The cache scripts decide with
it what to rebuild, the inspector what to report; fresh_digests.py lets a rerun skip the header read."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from .bounded_read import call_bounded, open_regular
from .sidecar import SidecarError, read_metadata


def image_source_identity(image: os.PathLike | str) -> dict[str, str]:
    """What identifies an image's content cheaply: its size and modification time."""
    stat = os.stat(image)
    return {"source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}


def content_digest(data: bytes) -> dict[str, str]:
    """The sha256 of a source's bytes, stored beside its size and modification time.

    Size and time are what every run checks (a stat); the digest is read only when the time alone
    differs, so a copy that did not keep modification times is recognised instead of re-encoded.
    """
    return {"source_sha256": hashlib.sha256(data).hexdigest()}


def _file_sha256(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_content_digest(path: os.PathLike | str) -> dict[str, str]:
    """The sha256 of a file's bytes, read within the read bound (ReadTimedOut, an OSError, if not)."""
    return {"source_sha256": call_bounded(path, _file_sha256, path)}


def caption_source_identity(text: str) -> dict[str, str]:
    """A caption is identified by the sha256 of its (stripped) text."""
    return {"caption_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def config_fingerprint(config: dict) -> str:
    """A short hash of an encoder's config, ignoring bookkeeping keys (paths, library versions)."""
    relevant = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Freshness:
    # "fresh", "retimed" (fresh, but its stored modification time is the source's old one),
    # "stale", "legacy", "missing" or "unreadable"
    status: str
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("fresh", "retimed", "legacy")


def check_freshness(path: os.PathLike | str, expected: dict[str, str],
                    source_digest: Callable[[], dict[str, str]] | None = None, verify: bool = False) -> Freshness:
    """Compare a sidecar's metadata with what the current source and encoder would write.

    ``expected`` holds every metadata key that must match (encoder identity and fingerprint,
    settings, source identity); a key whose expected value is None must be absent (a setting given
    when the sidecar was made and not now, such as --flip). When only the modification time differs and the sidecar stored
    the source's digest, ``source_digest()`` (reading the source) decides: same bytes, "retimed".
    With ``verify``, a sidecar whose metadata all match is also read by content: a source replaced by
    other bytes of the same size and modification time (``touch -r``) is "stale".
    """
    try:
        metadata = read_metadata(path)
    except FileNotFoundError:
        return Freshness("missing")
    except SidecarError as error:
        return Freshness("unreadable", error.reason)
    if "cachetrain_format" not in metadata:
        return Freshness("legacy", "written without metadata")
    differing = [key for key, value in expected.items()
                 if (key in metadata if value is None else metadata.get(key) != str(value))]
    if not differing and verify and source_digest is not None and "source_sha256" in metadata:
        try:
            if source_digest() != {"source_sha256": metadata["source_sha256"]}:
                return Freshness("stale", "other bytes under the same size and modification time (--verify)")
        except OSError as error:
            return Freshness("stale", f"cannot be read to verify ({error.strerror or error})")
    if not differing:
        return Freshness("fresh")
    if differing == ["source_mtime_ns"] and source_digest is not None and "source_sha256" in metadata:
        try:
            if source_digest() == {"source_sha256": metadata["source_sha256"]}:
                return Freshness("retimed", "same bytes, new modification time")
        except OSError:
            pass  # unreadable now: stale, and the rebuild reports why
    key = differing[0]
    now = "absent" if expected[key] is None else repr(expected[key])
    return Freshness("stale", f"{key} is {metadata.get(key)!r}, now {now}")
