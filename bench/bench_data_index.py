#!/usr/bin/env python3
"""The data index at scale: start-up of a 2-step train_from_cached.py run with and without the index,
the rescan after adding pairs to one folder, the index file format, and resident memory per pair.

    .venv/bin/python bench/bench_data_index.py --pairs 1000000 --tree /tmp/index-bench [--table_pairs 10000000]

1. writes ``--pairs`` pairs of tiny sidecars (latent [4,4,4] fp16, emb [77,32] fp16; 1,000 per folder,
   the same bytes in every file: only names, sizes and headers matter here) and a tiny model;
2. ``cachetrain-index`` builds the index (the one-time cost on a tree cached without one);
3. times ``train_from_cached.py --max_steps 2`` start to exit (and peak RSS, /usr/bin/time) with and
   without --aspect_buckets, with the index current and with ``--data_index off`` (a full walk);
4. adds 1,000 pairs to one folder and times the next start (only that folder is walked);
5. writes the 1M table as npz and as parquet (pyarrow, when installed): size and read time;
6. builds a ``--table_pairs`` table in memory (no files: names like the tree's), stores it, and in a fresh
   process reads it and pairs it as a start does: time and RSS growth per pair.
Deletes the tree unless --keep. A tree already at --tree (written by an earlier run with --keep or
--prepare, with the same --pairs) is reused: step 4's added pairs are removed first, so each run starts
from the same tree. ``--prepare`` writes the tree and the model and stops (to time them later, on an idle
machine); ``--index_current_only N`` builds the index, times step 3's runs with the index current N times
each, and stops (keeping the tree).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_FOLDER = 1000
ADDED_FOLDER = "f00007"  # step 4 adds its pairs here
TREE_RECORD = "tree.json"  # what an existing tree holds, so a rerun reuses only a tree of the same size


def write_tree(root: Path, pairs: int, start: int = 0, folder: str | None = None) -> None:
    import torch
    from safetensors.torch import save

    latent = save({"latent": torch.zeros(4, 4, 4, dtype=torch.float16)}, {"kind": "image_latent"})
    emb = save({"emb": torch.zeros(77, 32, dtype=torch.float16)}, {"kind": "text_embedding"})
    for i in range(start, start + pairs):
        where = root / (folder or f"f{i // PER_FOLDER:05d}")
        if i % PER_FOLDER == 0 or folder is not None:
            where.mkdir(parents=True, exist_ok=True)
        with open(where / f"s{i:08d}.img_sdvae", "wb") as handle:
            handle.write(latent)
        with open(where / f"s{i:08d}.txt_clipl", "wb") as handle:
            handle.write(emb)


def prepare_tree(work: Path, tree: Path, pairs: int) -> float | None:
    """Reuse the tree at ``tree`` when it holds ``pairs`` pairs (minus what step 4 added last time), else
    write it anew. Returns the seconds spent writing, or None when reused."""
    record = work / TREE_RECORD
    if tree.exists() and record.exists() and json.loads(record.read_text()).get("pairs") == pairs:
        for added in range(pairs, pairs + PER_FOLDER):
            for suffix in (".img_sdvae", ".txt_clipl"):
                (tree / ADDED_FOLDER / f"s{added:08d}{suffix}").unlink(missing_ok=True)
        return None
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    write_tree(tree, pairs)
    record.write_text(json.dumps({"pairs": pairs}))
    return round(time.perf_counter() - started, 1)


def timed(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(seconds start to exit, peak RSS in GB, stderr) of one command."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *command], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    rss = int(re.search(r"MAXRSS (\d+)", done.stderr).group(1)) / 1e6
    return seconds, rss, done.stderr


def train_start(model: Path, tree: Path, output: Path, *extra: str) -> tuple[float, float, str]:
    shutil.rmtree(output, ignore_errors=True)
    return timed([sys.executable, "train_from_cached.py", "--pretrained_model", str(model), "--train_data_dir",
                  str(tree), "--output_dir", str(output), "--max_steps", "2", "--batch_size", "4", "--num_workers",
                  "0", "--no_progress", "--save_steps", "0", *extra])


def index_lines(stderr: str) -> str:
    return " | ".join(line.strip() for line in stderr.splitlines()
                      if "data index of" in line or "--aspect_buckets:" in line)


def compare_formats(tree: Path) -> dict:
    from cachetrain.data_index import INDEX_FILE_NAME, INDEX_FOLDER_NAME, load_index_file

    stored = tree / INDEX_FOLDER_NAME / INDEX_FILE_NAME
    started = time.perf_counter()
    table = load_index_file(str(stored), str(tree))
    result = {"npz_bytes": stored.stat().st_size, "npz_read_s": round(time.perf_counter() - started, 3)}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return result
    rows = len(table)
    columns = {"stem": pa.array(_stems(table))}
    for k, suffix in enumerate(table.suffixes):
        columns[f"size{suffix}"] = table.file_sizes[:, k]
        columns[f"mtime{suffix}"] = table.file_mtime_ns[:, k]
        columns[f"ndim{suffix}"] = table.header_ndims[:, k]
        for d in range(3):
            columns[f"dim{d}{suffix}"] = table.header_shapes[:, k, d]
    path = tree / "bench-table.parquet"
    pq.write_table(pa.table(columns), path)
    started = time.perf_counter()
    back = pq.read_table(path)
    stems = back.column("stem").combine_chunks()  # names as arrow's blob + offsets, like the index
    arrays = [np.asarray(back.column(name)) for name in back.column_names if name != "stem"]
    result.update(parquet_bytes=path.stat().st_size, parquet_read_s=round(time.perf_counter() - started, 3),
                  rows=rows, checked=len(stems) == rows and len(arrays) == len(columns) - 1)
    path.unlink()
    return result


def _stems(table) -> list[str]:
    raw, ends, start, names = table.stem_names.tobytes(), table.stem_name_ends.tolist(), 0, []
    for end in ends:
        names.append(raw[start:end].decode())
        start = end
    return names


TABLE_PROBE = r"""
import os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from cachetrain.data_index import load_index_file
from cachetrain.indexed_pairs import pairs_from_tables
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
before = rss()
started = time.perf_counter()
table = load_index_file(sys.argv[2], sys.argv[3])
table.folder_devices = np.zeros(len(table.folder_name_ends), np.uint64)
index, unpaired = pairs_from_tables([sys.argv[3]], [table], ".img_sdvae", ".txt_clipl")
seconds = time.perf_counter() - started
with_table = rss()
del table
after = rss()
print(len(index), seconds, with_table - before, after - before,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def table_memory(pairs: int, workdir: Path) -> dict:
    """A table of ``pairs`` rows (names as the tree's, 1,000 per folder) stored and read by a fresh process."""
    from cachetrain.data_index import IndexTable, write_index

    folders = (pairs + PER_FOLDER - 1) // PER_FOLDER
    names = np.char.add("s", np.char.zfill(np.arange(pairs).astype(str), 8))
    stems = "".join(names.tolist()).encode()
    table = IndexTable(
        root=str(workdir), suffixes=(".img_sdvae", ".img_sdxl", ".txt_clipl", ".txt_t5cache"),
        folder_names=np.frombuffer("".join(f"f{f:05d}" for f in range(folders)).encode(), np.uint8),
        folder_name_ends=np.arange(1, folders + 1, dtype=np.int64) * 6,
        folder_parents=np.zeros(folders, np.int32), folder_mtime_ns=np.zeros(folders, np.int64),
        folder_inodes=np.zeros(folders, np.uint64),
        folder_row_ends=np.minimum(np.arange(1, folders + 1, dtype=np.int64) * PER_FOLDER, pairs),
        stem_names=np.frombuffer(stems, np.uint8), stem_name_ends=np.arange(1, pairs + 1, dtype=np.int64) * 9,
        file_sizes=np.tile(np.array([[272, 0, 5072, 0]], np.int64), (pairs, 1)),
        file_mtime_ns=np.zeros((pairs, 4), np.int64),
        header_ndims=np.tile(np.array([[3, -1, 2, -1]], np.int8), (pairs, 1)),
        header_shapes=np.tile(np.array([[[4, 4, 4], [0, 0, 0], [77, 32, 0], [0, 0, 0]]], np.int32), (pairs, 1, 1)))
    path = workdir / "table.npz"
    write_index(table, str(path))
    del table, names, stems
    done = subprocess.run([sys.executable, "-c", TABLE_PROBE, str(REPO), str(path), str(workdir)],
                          capture_output=True, text=True, check=True)
    count, seconds, with_table, after, peak = done.stdout.split()
    result = {"pairs": int(count), "file_bytes": path.stat().st_size, "read_and_pair_s": round(float(seconds), 2),
              "rss_bytes_per_pair_with_table": round(int(with_table) / pairs, 1),
              "rss_bytes_per_pair_after": round(int(after) / pairs, 1),
              "peak_rss_bytes_per_pair": round(int(peak) / pairs, 1)}
    path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--table_pairs", type=int, default=10_000_000)
    parser.add_argument("--tree", default="/tmp/index-bench")
    parser.add_argument("--keep", action="store_true", help="keep the tree for the next run")
    parser.add_argument("--prepare", action="store_true", help="write the tree and the model, then stop (keeps them)")
    parser.add_argument("--index_current_only", type=int, metavar="REPEATS", default=0,
                        help="after the index build, time only the starts with the index current, each REPEATS "
                             "times (what a fixed start costs shows in the spread), then stop (the tree is kept)")
    args = parser.parse_args()
    work = Path(args.tree)
    tree, model = work / "data", work / "model"
    results: dict = {"pairs": args.pairs}
    results["write_tree_s"] = prepare_tree(work, tree, args.pairs)
    if not model.exists():
        from cachetrain.tiny.models import build_tiny_sd

        build_tiny_sd(model, seed=0)
    if args.prepare:
        print(json.dumps(results))
        return
    time.sleep(4)  # folders older than the index's racy window, as in a tree cached a while ago
    seconds, rss, err = timed([sys.executable, "-m", "cachetrain.index_command", str(tree), "--no_progress", "--rebuild"])
    results["index_build"] = {"s": round(seconds, 1), "peak_rss_gb": round(rss, 2)}
    runs = {}
    if args.index_current_only:
        for repeat in range(args.index_current_only):
            for name, extra in (("index_no_buckets", ()), ("index_buckets", ("--aspect_buckets",))):
                seconds, rss, err = train_start(model, tree, work / "out", *extra)
                runs.setdefault(name, []).append({"s": round(seconds, 1), "peak_rss_gb": round(rss, 2),
                                                  "says": index_lines(err)})
                print(name, runs[name][-1], flush=True)
        print(json.dumps({**results, "train_2_steps": runs}, indent=1))
        return
    for name, extra in (("index_no_buckets", ()), ("index_buckets", ("--aspect_buckets",)),
                        ("off_no_buckets", ("--data_index", "off")),
                        ("off_buckets", ("--data_index", "off", "--aspect_buckets"))):
        seconds, rss, err = train_start(model, tree, work / "out", *extra)
        runs[name] = {"s": round(seconds, 1), "peak_rss_gb": round(rss, 2), "says": index_lines(err)}
        print(name, runs[name], flush=True)
    results["train_2_steps"] = runs
    write_tree(tree, PER_FOLDER, start=args.pairs, folder=ADDED_FOLDER)
    seconds, rss, err = train_start(model, tree, work / "out", "--aspect_buckets")
    results["after_adding_1000_pairs_to_one_folder"] = {"s": round(seconds, 1), "says": index_lines(err)}
    seconds, rss, err = train_start(model, tree, work / "out", "--aspect_buckets")
    results["next_start"] = {"s": round(seconds, 1), "says": index_lines(err)}
    results["formats"] = compare_formats(tree)
    results["table_memory"] = table_memory(args.table_pairs, work)
    print(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
