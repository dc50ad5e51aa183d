"""The shard manifest (shards.json): the contract between cachetrain-pack, which writes it beside the
shards, and a run, which reads it at start (train.shard_data). Its structure is checked whole before a
run trusts it: a damaged manifest is refused in one line instead of failing mid-read.
"""

from __future__ import annotations

import hashlib

MANIFEST_NAME = "shards.json"  # what a run reads: the shards and their rows
MANIFEST_FORMAT = "cachetrain-shards"
MANIFEST_VERSION = 1  # the newest format version this code writes and reads


def shard_sha256(path: str) -> str:
    """The digest the manifest records of a shard's bytes: a copy fetched or cached under its name is
    checked against it, since a repack rewrites a changed shard under the same name."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(values, low: int, high: int | None = None) -> bool:
    """A list of whole numbers, each >= low (and < high when given)."""
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        return False
    return not values or (min(values) >= low and (high is None or max(values) < high))


def manifest_problem(manifest: dict) -> str | None:
    """What is structurally wrong with a shard manifest, or None."""
    version = manifest.get("version")
    if not _is_int(version) or version < 1:
        return f"'version' is {version!r}, not a format version number"
    roots = manifest.get("roots")
    if not isinstance(roots, list) or not all(isinstance(root, str) for root in roots):
        return f"'roots' is {_short(roots)}, not a list of data root names"
    prompts = manifest.get("empty_prompts", [])
    if not isinstance(prompts, list) or not all(p is None or isinstance(p, str) for p in prompts):
        return f"'empty_prompts' is {_short(prompts)}, not a list of file names"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "no 'shards' list" if shards is None else f"'shards' is {_short(shards)}, not a list"
    first_listed: dict[str, int] = {}
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard {number} is {_short(shard)}, not an object"
        name, rows = shard.get("name"), shard.get("rows")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            return f"shard {number} has no valid 'name' ({_short(name)})"
        what = f"shard {number} ({name})"
        if name in first_listed:  # its pairs would be trained twice an epoch
            return f"{what} is listed twice (also shard {first_listed[name]})"
        first_listed[name] = number
        digest = shard.get("sha256")  # sets packed before it was recorded have none
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            return f"{what}: 'sha256' is {_short(digest)}, not a SHA-256 digest"
        if not _is_int(shard.get("bytes")) or shard["bytes"] < 0:
            return f"{what}: 'bytes' is {_short(shard.get('bytes'))}, not a byte count"
        if not _is_int(rows) or rows < 0:
            return f"{what}: 'rows' is {_short(rows)}, not a row count"
        keys = shard.get("keys")
        if not isinstance(keys, list) or len(keys) != rows or not all(isinstance(key, str) for key in keys):
            return f"{what}: 'keys' is not a list of {rows} keys"
        if not _ints(shard.get("roots"), 0, len(roots)) or len(shard["roots"]) != rows:
            return f"{what}: 'roots' is not a list of {rows} data root numbers below {len(roots)}"
        shapes = shard.get("shapes")
        if not isinstance(shapes, list) or not all(_ints(shape, 1) and shape for shape in shapes):
            return f"{what}: 'shapes' is not a list of latent shapes"
        if not _ints(shard.get("shape_ids"), 0, len(shapes)) or len(shard["shape_ids"]) != rows:
            return f"{what}: 'shape_ids' is not a list of {rows} numbers below {len(shapes)}"
        widths = shard.get("text_widths")
        if (not isinstance(widths, dict) or not all(isinstance(w, str) and w.isdigit() and int(w) > 0 for w in widths)
                or not _ints(list(widths.values()), 0) or sum(widths.values()) != rows):
            return f"{what}: 'text_widths' is not a count of text widths over its {rows} rows"
        left_out = shard.get("left_out", [])
        if not isinstance(left_out, list) or not all(isinstance(e, list) and len(e) == 2 for e in left_out):
            return f"{what}: 'left_out' is not a list of (path, reason)"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
