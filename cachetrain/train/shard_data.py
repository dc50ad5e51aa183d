"""Training from a packed shard set (cachetrain-pack): a local folder or a URL (s3://, gs://, https://).

Shards are Arrow IPC files read by pyarrow: each shard a process needs is fetched whole into a local
cache (size-capped, least recently used removed first) and memory-mapped; a row is read without
copying the rest of the shard.
The manifest lists every row's key, data root and latent shape, so the run's order, aspect buckets,
--data_balance and validation split are decided from it alone, by the same EpochOrder as the per-file
path: exact resume, disjoint shares per process and the refill of bad pairs come with it.
A shard that is missing or cut short makes its rows bad pairs (named, passed over); storage that
cannot be reached after retries stops the run (ShardStoreUnreachable).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch

from ..shard_manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, manifest_problem, shard_sha256

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
OPEN_SHARDS = 128  # memory-mapped shard tables each worker keeps open (a re-open costs ~5 ms)


class ShardStoreUnreachable(RuntimeError):
    """The shard storage did not answer after the retries (one line: the URL and the last error)."""


class ShardMismatch(ValueError):
    """The store's file is not the one the manifest lists (another size or digest)."""


def _check_download(path: str, size: int | None, sha256: str | None) -> None:
    found = os.path.getsize(path)
    if size is not None and found != size:
        raise ShardMismatch(f"the store's file is {found} bytes, its manifest says {size} (cut short, or "
                            "rewritten since the manifest was read?)")
    if sha256 is not None and shard_sha256(path) != sha256:
        raise ShardMismatch("the store's file is not the one its manifest lists (another sha256: rewritten "
                            "since the manifest was read?)")


class ShardSetError(ValueError):
    """A shard location that holds no readable manifest (refused at start)."""


def is_shard_location(location: str) -> bool:
    """A URL, or a local folder holding a shard manifest."""
    return location.startswith(REMOTE_SCHEMES) or os.path.isfile(os.path.join(location, MANIFEST_NAME))


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name if "://" in location else os.path.join(location, name)


class ShardStore:
    """Reads the files of one shard location; remote ones through a local, size-capped cache.

    Picklable (DataLoader workers get a copy); the remote filesystem is opened on first use in each
    process. Writes into the cache go to a temporary name and are renamed, so processes and workers
    that share the cache folder never see half a shard."""

    def __init__(self, location: str, cache_dir: str | None = None, cache_bytes: float = 50e9, retries: int = 5,
                 retry_wait: float = 0.5):
        self.location = location.rstrip("/") if "://" in location else os.path.abspath(location)
        self.remote = "://" in location
        digest = hashlib.sha256(self.location.encode("utf-8")).hexdigest()[:12]
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "cachetrain-shards", digest)
        self.cache_bytes, self.retries, self.retry_wait = cache_bytes, retries, retry_wait
        self._filesystem = None

    def __getstate__(self):
        return {**self.__dict__, "_filesystem": None}

    def _pyarrow_filesystem(self):
        if self._filesystem is None:
            from pyarrow import fs

            if self.location.startswith("s3://"):
                # the endpoint of an S3-compatible store (MinIO, moto ...), as boto3 and the AWS CLI read it
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                self._filesystem = fs.S3FileSystem(endpoint_override=endpoint, connect_timeout=5, request_timeout=30,
                                                   retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=2))
            else:
                self._filesystem, _ = fs.FileSystem.from_uri(self.location)
        return self._filesystem

    def _download(self, url: str, destination: str) -> None:
        """One try at fetching ``url``; FileNotFoundError when it is not there."""
        if url.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(url, timeout=30) as response, open(destination, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    raise FileNotFoundError(url) from None
                raise
            return
        filesystem = self._pyarrow_filesystem()
        path = url.split("://", 1)[1]
        if filesystem.get_file_info(path).type.name == "NotFound":
            raise FileNotFoundError(url)
        with filesystem.open_input_stream(path) as source, open(destination, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)

    def cached_path(self, name: str, sha256: str | None = None) -> str:
        """Where a remote file's copy lives in the cache: under its digest too, when the manifest gives
        one, so a shard a repack rewrote under the same name is fetched again, not taken from the cache."""
        return os.path.join(self.cache_dir, name if sha256 is None else f"{sha256[:16]}-{name}")

    def fetch(self, name: str, size: int | None = None, sha256: str | None = None) -> str:
        """A local path of file ``name`` of the location (downloaded into the cache when remote). A cached
        copy of another ``size`` (cut short) is fetched again; a download of another size or digest
        is a ShardMismatch.

        FileNotFoundError when it is not there; ShardStoreUnreachable when the store keeps failing."""
        if not self.remote:
            path = os.path.join(self.location, name)
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            return path
        local = self.cached_path(name, sha256)
        if self._usable_copy(local, size):
            os.utime(local)  # most recently used
            return local
        os.makedirs(self.cache_dir, exist_ok=True)
        # one fetch per shard per node: the workers and processes sharing the cache wait for it
        with open(os.path.join(self.cache_dir, f".{name}.lock"), "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._usable_copy(local, size):
                return local
            Path(local).unlink(missing_ok=True)
            return self._fetch_into_cache(name, local, size, sha256)

    @staticmethod
    def _usable_copy(local: str, size: int | None) -> bool:
        try:
            return size is None or os.path.getsize(local) == size
        except FileNotFoundError:
            return False

    def _fetch_into_cache(self, name: str, local: str, size: int | None, sha256: str | None) -> str:
        url, last_error = _join(self.location, name), None
        for attempt in range(self.retries):
            temporary = f"{local}.partial-{os.getpid()}-{attempt}"
            try:
                self._download(url, temporary)
                _check_download(temporary, size, sha256)
                os.replace(temporary, local)
                self._evict(keep=local)
                return local
            except FileNotFoundError:
                raise
            except (OSError, urllib.error.URLError) as error:
                last_error = error
                time.sleep(self.retry_wait * 2 ** attempt)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        raise ShardStoreUnreachable(f"{url}: no answer after {self.retries} tries ({str(last_error).strip()[:200]})")

    def _evict(self, keep: str) -> None:
        """Remove the least recently used cached shards until the cache holds at most its cap."""
        entries = []
        with os.scandir(self.cache_dir) as found:
            for entry in found:
                if (entry.is_file() and not entry.name.startswith(".") and ".partial-" not in entry.name
                        and entry.name != MANIFEST_NAME):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.cache_bytes:
                break
            if path != keep:
                try:
                    os.unlink(path)  # a reader that has it memory-mapped keeps its pages
                except FileNotFoundError:
                    pass
                total -= size

    def manifest(self) -> dict:
        where = _join(self.location, MANIFEST_NAME)
        made_cache_dir = self.remote and not os.path.isdir(self.cache_dir)
        try:
            if self.remote:
                os.makedirs(self.cache_dir, exist_ok=True)
                local = os.path.join(self.cache_dir, MANIFEST_NAME)
                temporary = f"{local}.partial-{os.getpid()}"
                try:
                    self._download_with_retries(where, temporary)
                except OSError:
                    with contextlib.suppress(OSError):  # a refused start leaves no half file, no empty folder
                        os.unlink(temporary)
                    if made_cache_dir:
                        with contextlib.suppress(OSError):  # another process may be filling it
                            os.rmdir(self.cache_dir)
                    raise
                os.replace(temporary, local)
            else:
                local = where
            manifest = json.loads(Path(local).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ShardSetError(f"--train_data_dir {self.location}: no shard manifest {MANIFEST_NAME} there "
                                "(pack a cached tree with cachetrain-pack)") from None
        except OSError as error:
            raise ShardSetError(f"--train_data_dir {self.location}: {_one_line(error)}") from None
        except ValueError as error:
            raise ShardSetError(f"{where}: not a readable shard manifest ({error})") from None
        if not isinstance(manifest, dict):
            raise ShardSetError(f"{where}: not a readable shard manifest (a JSON {type(manifest).__name__}, "
                                "not an object)")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ShardSetError(f"{where}: not a cachetrain shard manifest")
        version = manifest.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
            raise ShardSetError(f"{where}: shard manifest format version {version} is newer than this cachetrain "
                                f"reads (<= {MANIFEST_VERSION}); update cachetrain or pack the tree again")
        problem = manifest_problem(manifest)
        if problem:
            raise ShardSetError(f"{where}: not a readable shard manifest ({problem})")
        return manifest

    def _download_with_retries(self, url: str, destination: str) -> None:
        last_error = None
        for attempt in range(self.retries):
            try:
                return self._download(url, destination)
            except FileNotFoundError:
                raise
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise OSError(f"access refused ({error.code} {error.reason})") from None
                last_error = error
            except OSError as error:
                if _is_access_refused(error):
                    raise OSError(f"access refused ({_one_line(error)})") from None
                last_error = error
            time.sleep(self.retry_wait * 2 ** attempt)
        raise OSError(f"no answer after {self.retries} tries ({_one_line(last_error)})")


def unreachable_stop_message(error: ShardStoreUnreachable, step: int) -> str:
    """The run's last line when shard storage stopped answering (a worker's copy of the error carries
    its traceback: the last line is the message)."""
    message = str(error).strip().splitlines()[-1].removeprefix("ShardStoreUnreachable: ")
    return (f"{message}; stopped at step {step}: continue with --resume from the newest checkpoint once the "
            "storage answers")


def _one_line(error: BaseException | None) -> str:
    return " ".join(str(error).split())[:300]


def _is_access_refused(error: OSError) -> bool:
    text = str(error)
    return any(word in text for word in ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "INVALID_ACCESS_KEY",
                                         "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "403", "Forbidden"))


class ShardIndex:
    """The pairs of a shard set, in the form the run's order and loader use (like tree.PairIndex):
    per sample its shard, row, data root and latent shape number; keys only as a digest."""

    def __init__(self, store: ShardStore, shard_names: list[str], shard_bytes: list[int], roots: list[str],
                 shapes: list[tuple[int, ...]], text_widths: list[int]):
        self.store, self.shard_names, self.shard_bytes = store, shard_names, shard_bytes
        self.roots, self.shapes, self.text_widths = roots, shapes, text_widths
        self.empty_prompts: list[str | None] = []  # per data root: its empty-prompt file in the set, or None
        self.shard_of, self.row_of, self.root_of, self.shape_ids = array("I"), array("I"), array("I"), array("H")
        self.sample_numbers = array("I")  # per sample: its row number in the whole set (the fingerprint)
        self.keys_digest = ""  # every shard's keys, in order
        self.shard_sha256: list[str | None] = []  # per shard, as the manifest records it (None: packed before)
        self.shard_keys: list[bytes] = []  # per shard, a digest of its keys: an opened shard must hold them
        self._open: OrderedDict[int, object] = OrderedDict()  # this worker's memory-mapped shard tables
        self._bad_shards: dict[int, str] = {}

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict(), "_bad_shards": {}}

    @classmethod
    def open(cls, store: ShardStore) -> tuple[ShardIndex, list]:
        """The index of a shard set and the bad pairs its packing left out (column by column: a
        million rows take seconds)."""
        manifest = store.manifest()  # checked whole (manifest_problem): a damaged one is a ShardSetError
        try:
            return cls._from_manifest(store, manifest)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
            where = _join(store.location, MANIFEST_NAME)
            raise ShardSetError(f"{where}: not a readable shard manifest ({type(error).__name__}: "
                                f"{_one_line(error)})") from None

    @classmethod
    def _from_manifest(cls, store: ShardStore, manifest: dict) -> tuple[ShardIndex, list]:
        shapes: dict[tuple[int, ...], int] = {}
        widths: dict[int, int] = {}
        index = cls(store, [], [], list(manifest.get("roots", [])), [], [])
        index.empty_prompts = list(manifest.get("empty_prompts", []))  # sets packed before: none
        left_out, shard_digests = [], hashlib.sha256()
        for number, shard in enumerate(manifest["shards"]):
            index.shard_names.append(shard["name"])
            index.shard_bytes.append(int(shard["bytes"]))
            left_out += shard.get("left_out", [])
            rows = int(shard["rows"])
            index.shard_of.extend(array("I", [number]) * rows)
            index.row_of.extend(array("I", range(rows)))
            index.root_of.extend(array("I", shard["roots"]))
            numbers = [shapes.setdefault(tuple(shape), len(shapes)) for shape in shard["shapes"]]
            index.shape_ids.extend(array("H", [numbers[k] for k in shard["shape_ids"]]))
            for width, count in shard["text_widths"].items():
                widths[int(width)] = widths.get(int(width), 0) + count
            keys = _joined_keys(shard["keys"])
            shard_digests.update(keys)
            index.shard_keys.append(hashlib.blake2b(keys, digest_size=8).digest())
            index.shard_sha256.append(shard.get("sha256"))
        index.sample_numbers = array("I", range(len(index.shard_of)))
        index.keys_digest = shard_digests.hexdigest()
        index.shapes = list(shapes)
        index.text_widths = sorted(widths, key=lambda w: -widths[w])
        return index, left_out

    def __len__(self) -> int:
        return len(self.shard_of)

    def root_id(self, i: int) -> int:
        return self.root_of[i]

    def root_ids(self) -> array:
        return self.root_of

    def latent_shape(self, i: int) -> tuple[int, ...]:
        return self.shapes[self.shape_ids[i]]

    def commonest_shape(self) -> tuple[int, ...]:
        counts = torch.bincount(torch.as_tensor(self.shape_ids, dtype=torch.int64), minlength=len(self.shapes))
        return self.shapes[int(counts.argmax())]

    def subset(self, samples: Iterable[int]) -> ShardIndex:
        part = ShardIndex(self.store, self.shard_names, self.shard_bytes, self.roots, self.shapes, self.text_widths)
        for i in samples:
            part.shard_of.append(self.shard_of[i])
            part.row_of.append(self.row_of[i])
            part.root_of.append(self.root_of[i])
            part.shape_ids.append(self.shape_ids[i])
            part.sample_numbers.append(self.sample_numbers[i])
        part.keys_digest, part.shard_sha256, part.shard_keys = self.keys_digest, self.shard_sha256, self.shard_keys
        part.empty_prompts = self.empty_prompts
        return part

    def fingerprint(self) -> str:
        """A digest of the pair list (data roots and keys, in order): a resume must read the same."""
        return hashlib.sha256(self.keys_digest.encode() + self.sample_numbers.tobytes()).hexdigest()[:16]

    def where(self, i: int) -> str:
        return _join(self.store.location, self.shard_names[self.shard_of[i]]) + f"#row{self.row_of[i]}"

    def _table(self, shard: int):
        """The memory-mapped table of a shard, or the reason it cannot be read (str)."""
        if shard in self._bad_shards:
            return self._bad_shards[shard]
        table = self._open.get(shard)
        if table is not None:
            self._open.move_to_end(shard)
            return table
        import pyarrow as pa

        name, sha256 = self.shard_names[shard], self.shard_sha256[shard]
        try:
            path = self.store.fetch(name, self.shard_bytes[shard], sha256)
            size = os.path.getsize(path)
            if size != self.shard_bytes[shard]:
                raise ValueError(f"shard is {size} bytes, its manifest says {self.shard_bytes[shard]} (cut short?)")
            table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()  # zero-copy
            keys = _joined_keys(table.column("key").to_pylist())
            if hashlib.blake2b(keys, digest_size=8).digest() != self.shard_keys[shard]:
                raise ShardMismatch("its rows are not the pairs its manifest lists (another shard's file?)")
        except FileNotFoundError:
            self._bad_shards[shard] = "shard is missing"
            return self._bad_shards[shard]
        except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError
            self._bad_shards[shard] = f"shard cannot be read ({_one_line(error)})"
            if self.store.remote:  # a bad copy is not kept in the cache
                Path(self.store.cached_path(name, sha256)).unlink(missing_ok=True)
            return self._bad_shards[shard]
        self._open[shard] = table
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return table

    def read_pair(self, i: int):
        """(latent, embedding) of sample i, or (where, reason) when it cannot be trained on."""
        table = self._table(self.shard_of[i])
        if isinstance(table, str):
            return self.where(i), table
        row = self.row_of[i]
        try:
            latent = _tensor(table, "latent", row)
            emb = _tensor(table, "emb", row)
        except (ValueError, TypeError, RuntimeError) as error:
            return self.where(i), f"row cannot be read ({_one_line(error)})"
        return latent, emb


def _joined_keys(keys: list[str]) -> bytes:
    """A shard's keys as the digests take them (the set's fingerprint, and the check of an opened shard)."""
    return "\0".join(keys).encode("utf-8", "surrogateescape") + b"\1"


def _tensor(table, column: str, row: int) -> torch.Tensor:
    data = table.column(column)[row].as_buffer()
    shape = table.column(column + "_shape")[row].as_py()
    dtype = getattr(torch, table.column(column + "_dtype")[row].as_py())
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return flat.view(shape)


def print_left_out(left_out: list, is_main: bool) -> None:
    if is_main:
        for path, reason in left_out:
            print(f"[train] left out {path}: {reason} (when packed)", file=sys.stderr)
