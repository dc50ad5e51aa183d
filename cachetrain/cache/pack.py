"""Packing a cached tree into shards (cachetrain-pack): what a run streams at scale.

The per-file sidecars stay the source of truth; a shard set is built from them and can be rebuilt.
Each shard is one Arrow IPC file (uncompressed, written and read by pyarrow: a reader memory-maps
it and reads any row without copying the rest; see docs/data-at-scale.md for the measurement), one row
per pair: its key (the sample's path relative to its data root, without suffix), data root number,
latent and text embedding as raw bytes with shape and dtype, caption, and each sidecar's metadata.

Which pairs go into which shard depends only on their keys (a cut after each key whose hash falls
in 1/N of the range; N = --pairs_per_shard), so a pair added or removed changes only its own shard.
The manifest (``shards.json``) lists every shard's rows (key, data root, latent shape) for the
trainer, and each data root's empty-prompt embedding (what --caption_dropout swaps in), copied into
the shard set as ``empty_prompt-<root number><text suffix>``; ``sources.json`` records each shard's sidecars by size and mtime, so a repack after a
re-cache rewrites only the shards whose sidecars changed. Bad pairs are named and
left out (and recorded, so a repaired pair is packed next time).

The packer takes a plain list of ``PackPair`` (which pairs) and knows nothing of how they were found,
so any index of pairs can feed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import temporary_name, writable_problem, write_atomically
from ..cli import ArgumentParser, print_error
from ..sidecar import (CAPTION_EXTENSION, CLIP_L_SUFFIX, IMAGE_LATENT_KEY, SD_VAE_SUFFIX, TEXT_EMBEDDING_KEY,
                       SidecarError, empty_prompt_path)
from ..shard_manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, shard_sha256
from ..tree import index_training_pairs

SOURCES_NAME = "sources.json"  # what a repack reads: each shard's sidecars by size and mtime
SHARD_SUFFIX = ".arrow"
DEFAULT_PAIRS_PER_SHARD = 512  # ~77 MB of SD1.5 pairs (see docs/BENCHMARKS.md, "Shards")


class PackError(ValueError):
    """A pack that cannot be done (no pairs, an unreadable manifest ...), named in one line."""


@dataclass(frozen=True)
class PackPair:
    """One pair to pack: its key (relative path without suffix), data root number and files."""

    key: str
    root: int
    latent_path: str
    text_path: str
    caption_path: str | None


def pairs_of_tree(roots: list[str], image_suffix: str, text_suffix: str,
                  caption_suffix: str = CAPTION_EXTENSION) -> list[PackPair]:
    """Every pair with both sidecars under ``roots`` (through tree.index_training_pairs), keyed by
    its path relative to its root."""
    index, _unpaired = index_training_pairs(roots, image_suffix, text_suffix)
    pairs = []
    for i in range(len(index)):
        base = index.base_path(i)
        root = index.root_id(i)
        key = os.path.relpath(base, index.roots[root]).replace(os.sep, "/")
        pairs.append(PackPair(key, root, base + image_suffix, base + text_suffix, base + caption_suffix))
    return pairs


def _file_identity(path: str | None) -> list[int]:
    """[size, mtime_ns] of a file, [-1, -1] when it is missing."""
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return [stat.st_size, stat.st_mtime_ns] if stat else [-1, -1]


def pair_identity(pair: PackPair) -> list:
    """What says a pair's files changed: the key and each file's size and mtime."""
    return [pair.key, pair.root, *_file_identity(pair.latent_path), *_file_identity(pair.text_path),
            *_file_identity(pair.caption_path)]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def cut_into_shards(pairs: list[PackPair], pairs_per_shard: int) -> Iterator[list[PackPair]]:
    """Content-defined cuts: after each pair whose key hash falls in 1/N of the range once the shard
    holds N/4 pairs, and at 4N at most. A pair added or removed moves the bounds of its own shard
    (and rarely the next one's), no others."""
    threshold = (1 << 64) // max(1, pairs_per_shard)
    shard: list[PackPair] = []
    for pair in pairs:
        shard.append(pair)
        if ((len(shard) >= pairs_per_shard // 4 and _key_hash(f"{pair.root}/{pair.key}") < threshold)
                or len(shard) >= 4 * pairs_per_shard):
            yield shard
            shard = []
    if shard:
        yield shard


def shard_name(members: list[PackPair]) -> str:
    digest = hashlib.sha256("\n".join(f"{p.root}/{p.key}" for p in members).encode("utf-8", "surrogateescape"))
    return f"shard-{digest.hexdigest()[:16]}{SHARD_SUFFIX}"


def _read_sidecar_bytes(path: str, key: str, ndim: int) -> tuple[bytes, list[int], str, dict]:
    """(raw tensor bytes, shape, dtype name, metadata) of one sidecar; SidecarError when unreadable."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            if key not in handle.keys():
                raise SidecarError(path, f"has no tensor {key!r} (found {list(handle.keys())})")
            tensor = handle.get_tensor(key)
            metadata = handle.metadata() or {}
    except SidecarError:
        raise
    except Exception as error:
        raise SidecarError(path, f"not a readable safetensors file ({error})") from error
    if tensor.ndim != ndim:
        raise SidecarError(path, f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dims")
    if not torch.isfinite(tensor).all():
        raise SidecarError(path, f"tensor {key!r} holds NaN/Inf values")
    dtype = str(tensor.dtype).removeprefix("torch.")
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), list(tensor.shape), dtype, metadata


def _read_caption(path: str | None) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, TypeError, UnicodeDecodeError):
        return None


def write_shard(path: Path, members: list[PackPair]) -> tuple[dict, list[tuple[str, str]]]:
    """Write one shard file atomically. Returns (its rows as the manifest lists them, (path, reason) of
    the bad pairs)."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA_NAMES}
    rows, bad = [], []
    for pair in members:
        try:
            latent, latent_shape, latent_dtype, latent_meta = _read_sidecar_bytes(pair.latent_path, IMAGE_LATENT_KEY, 3)
            emb, emb_shape, emb_dtype, emb_meta = _read_sidecar_bytes(pair.text_path, TEXT_EMBEDDING_KEY, 2)
        except SidecarError as error:
            bad.append((str(error.path), error.reason))
            continue
        except OSError as error:
            bad.append((str(error.filename or pair.latent_path), error.strerror or str(error)))
            continue
        for name, value in (("key", pair.key), ("root", pair.root), ("latent", latent), ("latent_shape", latent_shape),
                            ("latent_dtype", latent_dtype), ("emb", emb), ("emb_shape", emb_shape),
                            ("emb_dtype", emb_dtype), ("caption", _read_caption(pair.caption_path)),
                            ("latent_meta", json.dumps(latent_meta)), ("emb_meta", json.dumps(emb_meta))):
            columns[name].append(value)
        rows.append((pair.key, pair.root, tuple(latent_shape), emb_shape[-1]))
    table = pa.table(columns, schema=shard_schema())
    temporary = temporary_name(path)
    try:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=64)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return describe_rows(rows), bad


def describe_rows(rows: list[tuple[str, int, tuple[int, ...], int]]) -> dict:
    """A shard's rows for the manifest, by column: keys, data roots, latent shapes (numbers into the
    shard's distinct shapes) and text widths; columns of plain numbers parse fast at millions of rows."""
    shapes: dict[tuple[int, ...], int] = {}
    widths: dict[int, int] = {}
    for _key, _root, shape, width in rows:
        shapes.setdefault(shape, len(shapes))
        widths[width] = widths.get(width, 0) + 1
    return {"rows": len(rows), "keys": [r[0] for r in rows], "roots": [r[1] for r in rows],
            "shapes": [list(shape) for shape in shapes], "shape_ids": [shapes[r[2]] for r in rows],
            "text_widths": {str(width): count for width, count in widths.items()}}


SHARD_SCHEMA_NAMES = ("key", "root", "latent", "latent_shape", "latent_dtype", "emb", "emb_shape", "emb_dtype",
                      "caption", "latent_meta", "emb_meta")


def shard_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("root", pa.int32()), ("latent", pa.binary()),
                      ("latent_shape", pa.list_(pa.int32())), ("latent_dtype", pa.string()), ("emb", pa.binary()),
                      ("emb_shape", pa.list_(pa.int32())), ("emb_dtype", pa.string()), ("caption", pa.string()),
                      ("latent_meta", pa.string()), ("emb_meta", pa.string())])


def read_sources(folder: Path) -> dict | None:
    """The previous pack's record of each shard's sidecars (None when there is none to compare with)."""
    path = folder / SOURCES_NAME
    if not path.exists() or not (folder / MANIFEST_NAME).exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PackError(f"{path}: not a readable record of packed sidecars ({error}); remove it to pack "
                        "from scratch") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version", 0) > MANIFEST_VERSION:
        raise PackError(f"{path}: not a cachetrain shard manifest of version <= {MANIFEST_VERSION}")
    return manifest


def copy_empty_prompts(roots: list[str], text_suffix: str, out: Path) -> list[str | None]:
    """Each data root's empty-prompt sidecar copied into the shard set, byte for byte; its name there, in
    the roots' order (None for a root whose text cache wrote none: --caption_dropout on it is refused)."""
    names: list[str | None] = []
    for number, root in enumerate(roots):
        source = empty_prompt_path(root, text_suffix)
        if not source.is_file():
            names.append(None)
            continue
        name = f"empty_prompt-{number}{text_suffix}"
        write_atomically(out / name, source.read_bytes())
        names.append(name)
    return names


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def out_problem(out: str, roots: list[str], image_suffix: str, text_suffix: str) -> str | None:
    """Why --out cannot take this pack (one line), or None. Checked before any work: a file; a data root
    or a folder inside one (its shards would be the tree's orphan sidecars to --prune, and the root a
    shard set to --train_data_dir) or one that holds a data root; a shard set of other data roots or
    suffixes (a repack of the same ones is the incremental update); a folder no file can be written in."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: is a file, not a folder; choose a folder for the shard set"
    where = Path(os.path.realpath(out))
    for root in roots:
        real = Path(os.path.realpath(root))
        if _inside(where, real):
            return (f"--out {out}: is inside the data root {root} (a shard set there would be pruned as orphan "
                    "sidecars and read by a run as the data root); choose a folder outside the data roots")
        if _inside(real, where):
            return f"--out {out}: holds the data root {root}; choose a folder outside the data roots"
    manifest_path = where / MANIFEST_NAME
    if manifest_path.exists():
        try:
            held = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict) or held.get("format") != MANIFEST_FORMAT:
            return (f"--out {out}: holds a {MANIFEST_NAME} that is not a readable cachetrain shard manifest; "
                    "choose another --out or remove it")
        names = [os.path.basename(os.path.normpath(r)) for r in roots]
        if (held.get("roots"), held.get("image_suffix"), held.get("text_suffix")) != (names, image_suffix, text_suffix):
            return (f"--out {out}: holds the shard set of data roots {_listed(held.get('roots'))} with "
                    f"{held.get('image_suffix')} + {held.get('text_suffix')} sidecars, not of "
                    f"{_listed(names)} with {image_suffix} + {text_suffix}; choose another --out or remove it")
    problem = writable_problem(out)
    if problem:
        return f"--out {out}: {problem}"
    return None


def _listed(names) -> str:
    return " ".join(map(str, names)) if isinstance(names, list) else repr(names)


@dataclass
class PackReport:
    shards: int
    written: int  # shards (re)written by this pack
    kept: int  # shards whose sidecars were unchanged
    removed: int  # shard files of the previous pack no longer used
    pairs: int  # pairs packed (good)
    left_out: list[tuple[str, str]]  # (path, reason) of the bad pairs
    seconds: float


def pack(pairs: Iterable[PackPair], out_dir: os.PathLike | str, roots: list[str], image_suffix: str,
         text_suffix: str, pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD) -> PackReport:
    """Pack ``pairs`` into shards under ``out_dir``; a shard whose pairs' files are unchanged since the
    last pack there is kept as it is. The manifest is written last (atomically): a killed pack leaves
    the previous manifest, whose shards are all still there."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_sources(out)
    old = {shard["name"]: shard for shard in (previous or {}).get("shards", [])}
    shards, left_out, written, kept = [], [], 0, 0
    for members in cut_into_shards(list(pairs), pairs_per_shard):
        name = shard_name(members)
        identities = [pair_identity(pair) for pair in members]
        before = old.get(name)
        path = out / name
        if (before is not None and before["members"] == identities and path.exists()
                and path.stat().st_size == before["shard"]["bytes"]):
            if "sha256" not in before["shard"]:  # packed before the digest was recorded
                before["shard"]["sha256"] = shard_sha256(str(path))
            shards.append(before)
            left_out += [tuple(entry) for entry in before["shard"]["left_out"]]
            kept += 1
            continue
        rows, bad = write_shard(path, members)
        left_out += bad
        written += 1
        shards.append({"name": name, "members": identities,
                       "shard": {"name": name, "bytes": path.stat().st_size, "sha256": shard_sha256(str(path)),
                                 **rows, "left_out": [list(entry) for entry in bad]}})
    for path, reason in left_out:
        print(f"[pack] left out {path}: {reason}", file=sys.stderr)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "image_suffix": image_suffix,
                "text_suffix": text_suffix, "roots": [os.path.basename(os.path.normpath(r)) for r in roots],
                "empty_prompts": copy_empty_prompts(roots, text_suffix, out),
                "shards": [shard["shard"] for shard in shards]}
    write_atomically(out / SOURCES_NAME, json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                                                     "shards": shards}, separators=(",", ":")))
    write_atomically(out / MANIFEST_NAME, json.dumps(manifest, separators=(",", ":")))
    in_use = {shard["name"] for shard in shards}
    removed = 0
    for name in old:
        if name not in in_use and (out / name).exists():
            (out / name).unlink()
            removed += 1
    return PackReport(len(shards), written, kept, removed, sum(s["shard"]["rows"] for s in shards), left_out,
                      time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="cachetrain-pack",
                            description="Pack cached sidecar pairs into Arrow shards the trainer streams.")
    parser.add_argument("data_root", nargs="+", help="folders of cached pairs (each is a group for --data_balance)")
    parser.add_argument("--out", required=True, help="the shard folder to write (a repack rewrites only what changed)")
    parser.add_argument("--imgcache_suffix", default=SD_VAE_SUFFIX)
    parser.add_argument("--txtcache_suffix", default=CLIP_L_SUFFIX)
    parser.add_argument("--caption_suffix", default=CAPTION_EXTENSION)
    parser.add_argument("--pairs_per_shard", type=int, default=DEFAULT_PAIRS_PER_SHARD,
                        help="pairs per shard on average (cuts fall by key, at most 4x this)")
    args = parser.parse_args(argv)
    try:
        if args.pairs_per_shard < 1:
            raise PackError(f"--pairs_per_shard must be at least 1, got {args.pairs_per_shard}")
        problem = out_problem(args.out, args.data_root, args.imgcache_suffix, args.txtcache_suffix)
        if problem:
            raise PackError(problem)
        pairs = pairs_of_tree(args.data_root, args.imgcache_suffix, args.txtcache_suffix, args.caption_suffix)
        if not pairs:
            raise PackError(f"no sample has both a {args.imgcache_suffix} and a {args.txtcache_suffix} sidecar "
                            f"under {' '.join(args.data_root)}; run the cache scripts first")
        report = pack(pairs, args.out, args.data_root, args.imgcache_suffix, args.txtcache_suffix, args.pairs_per_shard)
    except (PackError, FileNotFoundError) as error:
        print_error(str(error))
        return 2
    except OSError as error:  # a write that failed midway (full disk, lost permission ...): the manifest is
        # written last, so the previous shard set is still whole
        print_error(f"--out {args.out}: could not write the shard set ({error.strerror or error}"
                    f"{': ' + str(error.filename) if error.filename else ''}); the previous shard set there, "
                    "if any, is unchanged")
        return 2
    print(f"[pack] {report.pairs} pairs in {report.shards} shards under {args.out}: {report.written} written, "
          f"{report.kept} unchanged, {report.removed} removed, {len(report.left_out)} bad pairs left out "
          f"({report.seconds:.1f} s, {report.pairs / max(report.seconds, 1e-9):,.0f} pairs/s)", file=sys.stderr)
    return 0
