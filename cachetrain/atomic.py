"""Small files written so that a crash, a kill or a full disk never leaves half of one.

Each is written under a temporary name in the same folder, flushed, and renamed over the target:
a reader sees the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

TEMP_MARKER = ".partial-"


def temporary_name(path: Path) -> Path:
    """``dir/.name.partial-XXXXXXXX``: hidden, beside the target, unique per writer."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")


def prove_writable(folder: os.PathLike | str) -> None:
    """Make ``folder`` (and its parents) and write and remove a small file in it: OSError when it cannot
    hold a file, before any long work whose result would have nowhere to go."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_probe(folder)


def writable_problem(folder: os.PathLike | str) -> str | None:
    """Why no file could be written into ``folder``, or None; it need not exist yet (the nearest folder
    above it that exists is tried) and nothing is made, so a refusal leaves nothing behind."""
    folder = Path(folder).absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        _write_probe(existing)
    except OSError as error:
        return f"cannot be written in {existing} ({error.strerror or error})"
    return None


def _write_probe(folder: Path) -> None:
    probe = folder / f".write-test-{os.getpid()}"
    write_atomically(probe, b"ok")  # flushed: a full disk fails here, not at the real write
    probe.unlink()


def write_atomically(path: os.PathLike | str, data: bytes | str, mode: int | None = None, fsync: bool = True) -> None:
    """Replace ``path`` by ``data`` in one rename; on any failure the old file (if any) is untouched."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # a read-only folder: there is no temporary to remove, and the first error is the one
            pass
        raise


def write_tensors_atomically(path: os.PathLike | str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file replaced in one rename, written from the tensors' own memory: safetensors'
    save_file streams them, where save() first builds the whole file as one bytes object (twice the
    model's size at the peak: 7 GB more for an fp32 SD1.5 UNet). save_file writes its own temporary
    (``.tmpXXXXXX``) and renames it; it does so inside a ``.partial-`` folder of ours, so a killed write
    leaves only a name that says what it is."""
    from safetensors.torch import save_file

    path = Path(path)
    folder = temporary_name(path)
    try:
        folder.mkdir()
        written = folder / path.name
        save_file(tensors, written, metadata=metadata)
        descriptor = os.open(written, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(written, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
