"""``cachetrain-index ROOT...``: build or bring up to date the data index of trees cached by the
original scripts or by versions that kept none (the cache scripts keep it themselves from now on)."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from .cli import ArgumentParser, print_error
from .data_index import DEFAULT_SUFFIXES, INDEX_DIR_ENV, refresh


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="cachetrain-index",
                            description="Write the data index of each ROOT (ROOT/.cachetrain/data-index.npz): every "
                                        "sidecar's name, size, mtime and tensor shape, so that training starts "
                                        "without walking the tree. Folders unchanged since the last index are "
                                        "kept as they are; changed ones are walked again.")
    parser.add_argument("roots", nargs="+", metavar="ROOT", help="data roots (as given to --data_root)")
    parser.add_argument("--suffix", nargs="+", action="extend", default=[],
                        help=f"sidecar suffixes to track besides {' '.join(DEFAULT_SUFFIXES)}")
    parser.add_argument("--rebuild", action="store_true", help="walk every folder, trusting nothing stored")
    parser.add_argument("--index_dir", default=None,
                        help=f"where indexes of read-only roots go (default ${INDEX_DIR_ENV}, else "
                             "~/.cache/cachetrain/data-index)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    args = parser.parse_args(argv)
    for root in args.roots:
        if not os.path.isdir(root):
            problem = "not a folder (give the folder the pairs are in)" if os.path.exists(root) else "no such folder"
            print_error(f"{root}: {problem}")
            return 2
    status = 0
    for root in args.roots:
        started = time.perf_counter()
        progress = tqdm(unit="folder", desc=f"indexing {root}", disable=args.no_progress, dynamic_ncols=True,
                        file=sys.stderr)
        try:
            done = refresh(root, None, suffixes=args.suffix, index_dir=args.index_dir,
                           progress=progress, rebuild=args.rebuild)
        finally:
            progress.close()
        table = done.table
        counts = ", ".join(f"{int((table.header_ndims[:, k] != -1).sum())} {suffix}"
                           for k, suffix in enumerate(table.suffixes) if (table.header_ndims[:, k] != -1).any())
        where = done.written_to or "unchanged, not rewritten"
        if done.write_error:
            where, status = f"NOT written: {done.write_error}", 1
        note = f" (stored index ignored: {done.ignored})" if done.ignored else ""
        print(f"{root}: {done.folder_count} folders, {len(done.scanned)} walked{note}; {counts or 'no sidecars'}; "
              f"{time.perf_counter() - started:.1f} s; {where}")
    return status


if __name__ == "__main__":
    sys.exit(main())
