"""The sidecar contract: naming, file format, metadata, atomic write, read + validate (whether a sidecar is
current for its source: freshness.py).

A sidecar of ``dir/name.ext`` is ``dir/name<suffix>``: one safetensors file holding its main tensor
(``latent`` [C, H/f, W/f] for images, ``emb`` [T, D] for captions) and, in its header, metadata
saying what made it and from what. Sidecars written by the original scripts carry no metadata;
they are still read ("legacy").

Optional tensors ride beside the main one, so a reader that knows only the main one still reads the
file: an image sidecar may hold ``latent_flipped`` (the mirrored image's latent, --flip) and ``mask``
[1, H/f, W/f] (loss weights in [0, 1] at latent resolution, --mask); a text sidecar may hold
``emb_1``, ``emb_2``, ... (further caption variants; ``emb`` is the first).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Container, Iterable
from pathlib import Path

import torch
from safetensors.torch import load as deserialize
from safetensors.torch import save as serialize

from .atomic import write_atomically
from .bounded_read import NotRegularFile, ReadTimedOut, call_bounded, open_regular, read_file_bytes

FORMAT_VERSION = "1"

IMAGE_LATENT_KEY = "latent"
TEXT_EMBEDDING_KEY = "emb"
# the "tokens" metadata of a text sidecar stored trimmed to its caption's own tokens (T5): its token count
# is its own, and batches pad it
TRIMMED_TOKENS = "real tokens up to and including the end token"
FLIPPED_LATENT_KEY = "latent_flipped"  # the horizontally mirrored image's latent (--flip)
MASK_KEY = "mask"  # [1, h, w] loss weights at latent resolution (--mask)
# An image's mask file: x.jpg -> x.mask.png (never a source image itself, see is_source_image)
MASK_STEM_SUFFIX = ".mask"
MASK_EXTENSION = ".png"


def text_variant_key(variant: int) -> str:
    """The tensor of caption variant ``variant``: ``emb`` for the first (what old readers read), ``emb_N`` after."""
    return TEXT_EMBEDDING_KEY if variant == 0 else f"{TEXT_EMBEDDING_KEY}_{variant}"


def text_variant_count(keys) -> int:
    """How many caption variants a text sidecar holding tensors ``keys`` has (1 for an old sidecar)."""
    keys = set(keys)
    count = 0
    while text_variant_key(count) in keys:
        count += 1
    return count

SD_VAE_SUFFIX = ".img_sdvae"
SDXL_VAE_SUFFIX = ".img_sdxl"
CLIP_L_SUFFIX = ".txt_clipl"
T5_SUFFIX = ".txt_t5cache"

KNOWN_SUFFIXES = (SD_VAE_SUFFIX, SDXL_VAE_SUFFIX, CLIP_L_SUFFIX, T5_SUFFIX)

# The images sidecars are made from by default (each script's --extensions)
DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

CAPTION_EXTENSION = ".txt"  # the default --caption_suffix (the original T5 scripts' captions are .txtqs)
PREVIEW_EXTENSION = ".webp"  # x.img_sdvae -> x.img_sdvae.webp, as the original's --writepreview names it
# exactly what write_sidecar makes (atomic.temporary_name): "." + the sidecar's name + ".partial-" + 8 hex digits
TEMPORARY_NAME = re.compile(r"^\..+\.partial-[0-9a-f]{8}$")
# exactly what safetensors' own save_file makes beside its target (Rust's tempfile crate: ".tmp" and six
# letters or digits); older writers, the original scripts among them, leave these when killed
SAFETENSORS_TEMPORARY_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def _file_mode() -> int:
    """The permissions a plain open() would give a new file (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()

class SidecarError(ValueError):
    """A sidecar that cannot be used, with the file and the reason in the message."""

    def __init__(self, path: os.PathLike | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def sidecar_path(source: os.PathLike | str, suffix: str) -> Path:
    """``dir/name.ext`` -> ``dir/name<suffix>``."""
    stem, _ext = os.path.splitext(os.fspath(source))
    return Path(stem + suffix)


def caption_path(image: os.PathLike | str, caption_suffix: str = CAPTION_EXTENSION) -> Path:
    """The caption of ``dir/name.ext`` is ``dir/name.txt`` (``dir/name<caption_suffix>``)."""
    return sidecar_path(image, caption_suffix)


def preview_path(sidecar: os.PathLike | str) -> Path:
    """Where a latent's decoded preview goes: ``x.img_sdvae`` -> ``x.img_sdvae.webp``."""
    return Path(os.fspath(sidecar) + PREVIEW_EXTENSION)


def is_source_image(name: str, extensions: tuple[str, ...], sidecar_suffixes: tuple[str, ...] = ()) -> bool:
    """The one rule for which files sidecars are made from: an image of ``extensions`` (lower case, with
    the dot) whose stem does not end with a sidecar suffix. ``x.img_sdvae.webp`` (a preview written
    beside a sidecar, by us or by the original scripts) is made from a sidecar, never a source of one.
    """
    stem, extension = os.path.splitext(name)
    if extension.lower() not in extensions:
        return False
    stem = stem.lower()
    return not any(stem.endswith(suffix.lower()) for suffix in (*KNOWN_SUFFIXES, MASK_STEM_SUFFIX, *sidecar_suffixes))


def mask_path(image: os.PathLike | str) -> Path:
    """The mask of ``dir/name.ext`` is ``dir/name.mask.png`` (white trains, black does not)."""
    return sidecar_path(image, MASK_STEM_SUFFIX + MASK_EXTENSION)


def sidecar_sources(files: Iterable[str], suffix: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """``dir/name`` -> the file among ``files`` that the sidecar ``dir/name<suffix>`` was made from.

    A file counts when it is a source image (is_source_image) of ``extensions`` or of the default
    image extensions: the sidecar of an image one run leaves out is still that image's, no orphan.
    For two files of one name, one of ``extensions`` wins, else the first in ``files`` (walk order),
    as the cache builders keep the first of a name clash.
    """
    wanted = tuple(extension.lower() for extension in extensions)
    any_image = (*wanted, *DEFAULT_IMAGE_EXTENSIONS)
    preferred: dict[str, str] = {}
    others: dict[str, str] = {}
    for path in files:
        name = os.path.basename(path)
        if is_source_image(name, wanted, (suffix,)):
            preferred.setdefault(os.path.splitext(path)[0], path)
        elif is_source_image(name, any_image, (suffix,)):
            others.setdefault(os.path.splitext(path)[0], path)
    return {**others, **preferred}


def is_orphan(sidecar: str, suffix: str, sources: Container[str]) -> bool:
    """The one orphan rule, for the cache builders' --prune and the inspector alike: ``dir/name<suffix>``
    is an orphan when ``sources`` (sidecar_sources of the files around it) has no ``dir/name``.

    Names compare exactly, as sidecar_path makes them (the suffix itself in any case, as walks find
    it). (A text sidecar whose caption file is gone is found by read_caption, not here:
    ``CaptionRejected.source_gone``.)
    """
    return sidecar[: -len(suffix)] not in sources


EMPTY_PROMPT_STEM = ".empty_prompt"


def empty_prompt_path(data_root: os.PathLike | str, suffix: str) -> Path:
    """Where a data root's empty-prompt embedding lives (hidden, so walks never take it for a sample)."""
    return Path(data_root) / (EMPTY_PROMPT_STEM + suffix)


class CaptionRejected(ValueError):
    """A caption that gets no embedding; ``kind`` groups it in summaries."""

    def __init__(self, kind: str, reason: str, source_gone: bool = False):
        super().__init__(reason)
        self.kind = kind
        self.source_gone = source_gone  # no caption at all: an old text sidecar is an orphan


def read_caption(image_path: str, caption_suffix: str = CAPTION_EXTENSION) -> str:
    """The stripped text of the image's caption file; CaptionRejected with the reason if unusable."""
    path = caption_path(image_path, caption_suffix)
    try:
        raw = read_file_bytes(path)  # within the read bound: a caption on a hung mount is named, not waited for
    except FileNotFoundError:
        raise CaptionRejected("no caption", f"no caption file {path.name}", source_gone=True) from None
    except ReadTimedOut as error:
        raise CaptionRejected("no answer", f"caption {path.name} {error.strerror}") from None
    except OSError as error:
        raise CaptionRejected("unreadable caption", f"cannot read {path.name}: {error}") from None
    try:
        return raw.decode("utf-8-sig").strip()  # -sig: a byte-order mark is no part of the caption
    except UnicodeDecodeError as error:
        raise CaptionRejected("caption not UTF-8",
                              f"caption {path.name} is not UTF-8 ({error.reason} at byte {error.start})") from None


def is_temporary(name: str) -> bool:
    """True for a name that a sidecar writer's temporary has: ours, or safetensors' own ``.tmpXXXXXX``.

    Matched exactly, so a user's file that merely contains ".partial-" is never taken for one; a
    safetensors-style name is short enough that a user could have chosen it, so cleanup also asks
    ``is_abandoned_temporary_content`` before it removes such a file.
    """
    return TEMPORARY_NAME.match(name) is not None or SAFETENSORS_TEMPORARY_NAME.match(name) is not None


def is_abandoned_temporary_content(path: os.PathLike | str) -> bool:
    """Whether a file under a temporary's name may be removed as a killed writer's, judged by its content.

    Our own names (hidden, ".partial-" and 8 hex digits) are only ever ours, whatever they hold (a
    sidecar or a preview); a safetensors-style ``.tmpXXXXXX`` must also begin as a sidecar does.
    """
    name = os.path.basename(os.fspath(path))
    return TEMPORARY_NAME.match(name) is not None or holds_sidecar_start(path)


def holds_sidecar_start(path: os.PathLike | str) -> bool:
    """True when the file is empty or begins as a safetensors file does (8-byte header length, then '{').

    What a writer killed mid-write leaves; any other content under a temporary's name is a user's file.
    """
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
    except OSError:
        return False
    if not start:
        return True
    return len(start) == 9 and start[8:9] == b"{" and int.from_bytes(start[:8], "little") <= MAX_HEADER_BYTES


def write_sidecar(path: os.PathLike | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` to ``path`` atomically.

    Serialized to bytes here and written once, under our own temporary name, then renamed over ``path``
    (safetensors' save_file would add a temporary and a rename of its own). A reader, or a rerun after
    SIGKILL, sees the old file, the new one, or none: never half.

    No fsync per file: a cache is millions of small files and a sync each would cost a disk round trip
    per file. A process killed mid-write leaves only a temporary (cleaned by the next run); a machine
    that loses power may leave a renamed file whose data never reached the disk, and the next run's
    header and length check (``read_metadata``) finds it unreadable and rebuilds it.

    Raises OSError when the file cannot be written (disk full, read-only folder) and ValueError (or
    safetensors' own error) when the tensors cannot be serialized; the old file is untouched either way.
    """
    metadata = {"cachetrain_format": FORMAT_VERSION, **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, serialize(tensors, metadata=metadata), mode=FILE_MODE, fsync=False)


# A header larger than this is not one of ours (ours are a few hundred bytes); refuse to read it.
MAX_HEADER_BYTES = 1 << 20


def _read_header_bytes(path: os.PathLike | str) -> tuple[bytes, int, int]:
    """(the header's bytes, the length the prefix claims, the file's size): the reads read_header makes."""
    try:
        handle = open_regular(path)  # FileNotFoundError passes through: "missing", not "unreadable"
    except NotRegularFile as error:
        raise SidecarError(path, error.strerror) from None
    with handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SidecarError(path, f"not a readable safetensors file ({len(prefix)} bytes long)")
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES:
            raise SidecarError(path, f"not a readable safetensors file (header claims {header_size} bytes)")
        return handle.read(header_size), header_size, os.fstat(handle.fileno()).st_size


def read_header(path: os.PathLike | str) -> dict:
    """The safetensors header of a sidecar (its tensors' entries and ``__metadata__``). Raises
    SidecarError if unreadable, or if the read does not finish within the read bound (bounded_read).

    Reads only the header (no mmap of the data), and checks that the file is as long as the header
    says: a truncated copy is caught here, not when training reads it. Planning a cache run and
    indexing a bucketed training set call this once per file, so it must stay cheap.
    """
    try:
        raw_header, header_size, file_size = call_bounded(path, _read_header_bytes, path)
    except ReadTimedOut as error:  # kept as the cause: a read that did not answer is no verdict on the file
        raise SidecarError(path, error.strerror) from error
    return _parse_header(path, raw_header, header_size, file_size)


def _parse_header(path: os.PathLike | str, raw_header: bytes, header_size: int, file_size: int) -> dict:
    try:
        header = json.loads(raw_header)
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise SidecarError(path, f"not a readable safetensors file (bad header: {error})") from None
    if len(raw_header) < header_size or file_size < 8 + header_size + data_end:
        raise SidecarError(path, f"truncated: {file_size} bytes, the header describes {8 + header_size + data_end}")
    return header


def read_sidecar_file(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a sidecar and its metadata, from one read of the whole file within the read bound.

    The bytes are read first and parsed afterwards (not memory-mapped): a mapped file that never answers
    would block inside the parser, beyond the bound's reach. Raises SidecarError if the file is
    unreadable, not a safetensors file, or did not answer in time; FileNotFoundError passes through."""
    try:
        data = read_file_bytes(path)
    except ReadTimedOut as error:
        raise SidecarError(path, error.strerror) from None
    except NotRegularFile as error:
        raise SidecarError(path, error.strerror) from None
    except FileNotFoundError:
        raise
    except OSError as error:
        raise SidecarError(path, f"cannot be read ({error.strerror or error})") from None
    header_size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        tensors = deserialize(data)
    except Exception as error:  # safetensors' own error for bytes it cannot use
        raise SidecarError(path, f"not a readable safetensors file ({error})") from None
    metadata = _parse_header(path, data[8:8 + header_size], header_size, len(data)).get("__metadata__") or {}
    return tensors, dict(metadata)


def read_metadata(path: os.PathLike | str) -> dict[str, str]:
    """The header metadata of a sidecar ({} for a legacy one). Raises SidecarError if unreadable."""
    return dict(read_header(path).get("__metadata__") or {})


def read_sidecar(path: os.PathLike | str, key: str, ndim: int = 0) -> torch.Tensor:
    """Read the tensor ``key`` of a sidecar, checking that it is there and has ``ndim`` dims."""
    tensors, _metadata = read_sidecar_file(path)
    if key not in tensors:
        raise SidecarError(path, f"has no tensor {key!r} (found {list(tensors)})")
    tensor = tensors[key]
    if ndim and tensor.ndim != ndim:
        raise SidecarError(path, f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dims")
    return tensor


def read_sidecar_tensors(path: os.PathLike | str, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Those of ``keys`` a sidecar holds, read in one open; a key it lacks is absent from the result.

    Raises SidecarError if the file is unreadable (FileNotFoundError passes through)."""
    tensors, _metadata = read_sidecar_file(path)
    return {key: tensors[key] for key in keys if key in tensors}


def read_text_variants(path: os.PathLike | str) -> list[torch.Tensor]:
    """Every caption variant of a text sidecar ([T_i, D] each, ``emb`` first); one for an old sidecar."""
    tensors, _metadata = read_sidecar_file(path)
    count = text_variant_count(tensors)
    if count == 0:
        raise SidecarError(path, f"has no tensor {TEXT_EMBEDDING_KEY!r} (found {list(tensors)})")
    variants = [tensors[text_variant_key(v)] for v in range(count)]
    for variant, tensor in enumerate(variants):
        if tensor.ndim != 2:
            raise SidecarError(path, f"tensor {text_variant_key(variant)!r} has shape {tuple(tensor.shape)}, "
                                     f"expected 2 dims")
    return variants


def update_metadata(path: os.PathLike | str, changes: dict[str, str]) -> None:
    """Rewrite a sidecar (atomically) with some metadata values changed; its tensors stay as they are.

    Raises SidecarError if the sidecar cannot be read back, OSError if it cannot be written."""
    tensors, metadata = read_sidecar_file(path)
    write_sidecar(path, tensors, {**metadata, **changes})
