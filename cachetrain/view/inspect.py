"""What is in a cache: sidecar counts, freshness, shapes, broken values and the statistics that set scales.

    python -m cachetrain.inspect DIR... [--suffix .img_sdvae ...] [--json]

Exit status: 0 when every sidecar found can be trained on; 1 when any is unreadable, holds NaN/Inf or
has an odd shape (see ``broken_count``); 2 for a folder that is not there. Stale sidecars and orphans
are reported but do not change the status: the cache scripts rebuild or prune them.

Freshness is judged without loading any encoder: each sidecar's recorded source identity (size and
mtime of its image, sha256 of its caption) is compared with the source file as it is now. A sidecar
whose source is gone is an orphan, by the rule the cache builders' --prune follows (sidecar.is_orphan).
Whether the encoder has changed cannot be judged this way, so the encoders that made the sidecars are
listed instead.

Latent statistics are per channel over every finite latent with the usual channel count; the
suggested VAE scaling factor is 1 / (std of all those values), the rule SD's 0.18215 came from.

(This module is ``cachetrain.inspect``; inside the package ``import inspect`` still means the standard
library, because imports are absolute.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..cli import ArgumentParser
from . import cache_tools
from ..freshness import caption_source_identity, check_freshness, file_content_digest, image_source_identity
from ..sidecar import (CAPTION_EXTENSION, DEFAULT_IMAGE_EXTENSIONS, IMAGE_LATENT_KEY, KNOWN_SUFFIXES,
                      TEXT_EMBEDDING_KEY, TRIMMED_TOKENS, SidecarError, FLIPPED_LATENT_KEY, MASK_KEY, is_orphan, read_caption,
                      read_header, read_sidecar, sidecar_sources, text_variant_count)
from ..tree import normalize_extensions, walk_files

# "retimed": usable, the source's bytes are the same under a new modification time (a copy that did
# not keep times); the cache scripts store the new time on their next run
# what a "fresh" verdict rests on, said beside the counts: an image's bytes are not read when its size and
# modification time match (a file replaced under the same size and time, `touch -r`, still reads fresh)
FRESH_RESTS_ON = {
    "image_latent": "fresh = same image size and modification time (bytes not read; the cache scripts' --verify "
                    "hashes every image)",
    "text_embedding": "fresh = same caption text (its sha256 compared)",
}
STATUSES = ("fresh", "retimed", "stale", "legacy", "orphan", "unreadable")
FILES_KEPT = 1000  # per list: counts stay exact on huge caches, the lists of file names do not grow without end
FILES_SHOWN = 5  # per list, in the text report


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


class RunningMoments:
    """Count, mean and sum of squared deviations per column, merged file by file in float64.

    Merging per-file moments (rather than summing x and x^2) keeps the std exact even when the mean
    is large compared with the spread.
    """

    def __init__(self, columns: int):
        self.count = 0
        self.mean = torch.zeros(columns, dtype=torch.float64)
        self.squared_deviations = torch.zeros(columns, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        """``values`` is [columns, n]: n new observations of each column."""
        values = values.to(torch.float64)
        n = values.shape[1]
        if n == 0:
            return
        batch_mean = values.mean(dim=1)
        batch_deviations = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.squared_deviations += batch_deviations + delta**2 * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        return (self.squared_deviations / max(self.count, 1)).sqrt()

    def pooled(self) -> tuple[float, float]:
        """Mean and std of all columns taken together (each column has the same count)."""
        mean = self.mean.mean()
        deviations = self.squared_deviations.sum() + self.count * ((self.mean - mean) ** 2).sum()
        return float(mean), float((deviations / max(self.count * len(self.mean), 1)).sqrt())


@dataclass
class SuffixReport:
    """Everything found about the sidecars of one suffix."""

    suffix: str
    count: int = 0
    statuses: Counter = field(default_factory=Counter)
    not_fresh: list[dict] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)
    # what training holds each file to: its whole shape, but the width alone of a text embedding stored
    # trimmed to its caption's own tokens (T5 sidecars: their token counts differ, and batches pad them)
    trained_shapes: Counter = field(default_factory=Counter)
    files_by_shape: dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    # Latents cached with aspect buckets: shapes counted per bucket, whose usual shape each has its own
    bucket_shapes: dict[str, Counter] = field(default_factory=dict)
    files_by_bucket_shape: dict[tuple[str, tuple[int, ...]], list[str]] = field(default_factory=dict)
    non_finite: list[dict] = field(default_factory=list)
    non_finite_count: int = 0
    encoders: Counter = field(default_factory=Counter)
    latent_moments: dict[int, RunningMoments] = field(default_factory=dict)  # by channel count
    latent_files: Counter = field(default_factory=Counter)  # by channel count
    token_norms: RunningMoments = field(default_factory=lambda: RunningMoments(1))
    token_norm_min: float = float("inf")
    token_norm_max: float = float("-inf")
    embedding_files: int = 0
    extras: Counter = field(default_factory=Counter)  # caption variants, mirrored latents, masks (data features)

    @property
    def usual_shape(self) -> tuple[int, ...] | None:
        return self.shapes.most_common(1)[0][0] if self.shapes else None

    def odd_shape_files(self) -> list[dict]:
        """Files whose shape differs from the usual one as training compares them (a trimmed text embedding:
        its width): of all files, or of their bucket's files."""
        unbucketed = Counter(self.trained_shapes)
        for counts in self.bucket_shapes.values():
            unbucketed.subtract(counts)
        unbucketed = +unbucketed
        usual = unbucketed.most_common(1)[0][0] if unbucketed else None
        odd = [{"path": path, "shape": list(shape)} for trained, files in self.files_by_shape.items()
               if trained != usual for path, shape in files]
        for (bucket, shape), paths in self.files_by_bucket_shape.items():
            if shape != self.bucket_shapes[bucket].most_common(1)[0][0]:
                odd += [{"path": path, "shape": list(shape), "bucket": bucket} for path in paths]
        return odd

    def add_status(self, path: str, status: str, reason: str = "") -> None:
        self.statuses[status] += 1
        if status != "fresh" and len(self.not_fresh) < FILES_KEPT:
            self.not_fresh.append({"path": path, "status": status, "reason": reason})

    def add_tensor(self, path: str, key: str, tensor: torch.Tensor, bucket: str = "", trimmed: bool = False) -> None:
        """``bucket``: the size a latent cached with aspect buckets was cropped to ("" for any other);
        ``trimmed``: a text embedding of its caption's own tokens, whose count is its own."""
        shape = tuple(tensor.shape)
        self.kinds["image_latent" if key == IMAGE_LATENT_KEY else "text_embedding"] += 1
        self.dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
        self.shapes[shape] += 1
        trained = shape[-1:] if trimmed else shape
        self.trained_shapes[trained] += 1
        if bucket:
            self.bucket_shapes.setdefault(bucket, Counter())[shape] += 1
            kept, entry = self.files_by_bucket_shape.setdefault((bucket, shape), []), path
        else:
            kept, entry = self.files_by_shape.setdefault(trained, []), (path, shape)
        if len(kept) < FILES_KEPT:
            kept.append(entry)
        values = tensor.to(torch.float64)
        nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
        if nan or inf:
            self.non_finite_count += 1
            if len(self.non_finite) < FILES_KEPT:
                self.non_finite.append({"path": path, "nan": nan, "inf": inf})
            return  # one NaN would turn every statistic below into NaN
        if key == IMAGE_LATENT_KEY and values.ndim >= 1:
            channels = values.shape[0]
            self.latent_moments.setdefault(channels, RunningMoments(channels)).add(values.reshape(channels, -1))
            self.latent_files[channels] += 1
        elif key == TEXT_EMBEDDING_KEY and values.ndim >= 1 and values.numel():
            norms = values.reshape(-1, values.shape[-1]).norm(dim=-1)
            self.token_norms.add(norms[None, :])
            self.token_norm_min = min(self.token_norm_min, float(norms.min()))
            self.token_norm_max = max(self.token_norm_max, float(norms.max()))
            self.embedding_files += 1

    def as_dict(self) -> dict:
        usual = self.usual_shape
        report = {
            "count": self.count,
            "kinds": dict(self.kinds),
            "status": {status: self.statuses[status] for status in STATUSES},
            "not_fresh": self.not_fresh,
            "dtypes": dict(self.dtypes.most_common()),
            "shapes": {shape_text(shape): n for shape, n in self.shapes.most_common()},
            "usual_shape": list(usual) if usual is not None else None,
            "odd_shape_files": self.odd_shape_files(),
            "non_finite_count": self.non_finite_count,
            "non_finite_files": self.non_finite,
            "encoders": dict(self.encoders.most_common()),
            "extras": dict(self.extras),
        }
        if self.latent_files:
            # the statistics of the channel count most files have (an odd one would not mix with them)
            channels = usual[0] if usual is not None and usual[0] in self.latent_moments \
                else self.latent_files.most_common(1)[0][0]
            moments = self.latent_moments[channels]
            mean, std = moments.pooled()
            report["latent"] = {"channels": channels, "files": self.latent_files[channels],
                                "channel_mean": moments.mean.tolist(), "channel_std": moments.std().tolist(),
                                "mean": mean, "std": std,
                                "suggested_scaling_factor": 1.0 / std if std > 0 else None}
        if self.embedding_files:
            report["embedding_token_norms"] = {
                "files": self.embedding_files, "tokens": self.token_norms.count,
                "mean": float(self.token_norms.mean[0]), "std": float(self.token_norms.std()[0]),
                "min": self.token_norm_min, "max": self.token_norm_max}
        return report


def source_identity(image: str, key: str, caption_suffix: str = CAPTION_EXTENSION) -> dict[str, str]:
    if key == TEXT_EMBEDDING_KEY:
        return caption_source_identity(read_caption(image, caption_suffix))
    return image_source_identity(image)


def read_any_sidecar(path: str, suffix: str) -> tuple[str, torch.Tensor]:
    """(key, tensor) of a latent or text sidecar; the suffix says which to try first."""
    # text sidecars are named after the caption: x.txt -> x.txt_clipl, x.txt_t5cache
    text_first = suffix.lower().startswith(CAPTION_EXTENSION)
    keys = (TEXT_EMBEDDING_KEY, IMAGE_LATENT_KEY) if text_first else (IMAGE_LATENT_KEY, TEXT_EMBEDDING_KEY)
    try:
        return keys[0], read_sidecar(path, keys[0])
    except SidecarError as first_error:
        try:
            return keys[1], read_sidecar(path, keys[1])
        except SidecarError:
            raise first_error from None


def inspect_sidecar(path: str, suffix: str, report: SuffixReport, sources: dict[str, str],
                    caption_suffix: str | None = None) -> None:
    """Add one sidecar to ``report``; ``sources`` are sidecar.sidecar_sources of the images walked."""
    report.count += 1
    try:
        key, tensor = read_any_sidecar(path, suffix)
        header = read_header(path)
        metadata = dict(header.get("__metadata__") or {})
    except SidecarError as error:
        report.add_status(path, "unreadable", error.reason)
        return
    bucketed = "," in metadata.get("resolution", "")  # cached with aspect buckets: several sizes on purpose
    report.add_tensor(path, key, tensor, metadata.get("size", "?") if bucketed else "",
                      trimmed=metadata.get("tokens") == TRIMMED_TOKENS)
    count_extras(report, key, header.keys())
    if metadata:
        report.encoders[f"{metadata.get('encoder', '?')} ({metadata.get('encoder_class', '?')}, "
                        f"fingerprint {metadata.get('encoder_fingerprint', '?')})"] += 1
    # --caption_suffix if given, else the one the sidecar records, else .txt (the original T5 scripts' are .txtqs)
    caption_suffix = caption_suffix or metadata.get("caption_suffix", CAPTION_EXTENSION)
    # the cache builders' orphan rule (sidecar.is_orphan): the image is gone, or the caption of an embedding
    if is_orphan(path, suffix, sources):
        report.add_status(path, "orphan", "its source file is gone")
        return
    source = sources[path[: -len(suffix)]]
    try:
        expected = source_identity(source, key, caption_suffix)
    except (OSError, ValueError) as error:  # a caption that is no longer UTF-8, a file that vanished
        if getattr(error, "source_gone", False):
            report.add_status(path, "orphan", "its source file is gone")
        else:
            report.add_status(path, "stale", str(error))
        return
    digest = functools.partial(file_content_digest, source) if key == IMAGE_LATENT_KEY else None
    freshness = check_freshness(path, expected, digest)
    report.add_status(path, freshness.status, freshness.reason)


def count_extras(report: SuffixReport, key: str, tensors) -> None:
    """Count what a sidecar holds beside its main tensor (see the sidecar contract)."""
    if key == TEXT_EMBEDDING_KEY:
        variants = text_variant_count(tensors)
        report.extras["caption variants"] += variants
        report.extras["files with several captions"] += variants > 1
        return
    report.extras["mirrored latents"] += FLIPPED_LATENT_KEY in tensors
    report.extras["masks"] += MASK_KEY in tensors


def inspect_cache(roots: list[str], suffixes: list[str] | None = None, show_progress: bool = False,
                  image_extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS,
                  caption_suffix: str | None = None) -> dict:
    """The report of every sidecar with one of ``suffixes`` under ``roots``, as a JSON-ready dict.

    ``image_extensions`` are those the latents were made from (the cache builder's --extensions);
    ``caption_suffix`` names the captions of text sidecars (default: the suffix each records, else .txt).
    """
    suffixes = list(dict.fromkeys(suffixes or KNOWN_SUFFIXES))
    image_extensions = normalize_extensions(image_extensions)
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"cache folder not found: {root}")
    # one walk finds the sidecars and the images they may have been made from, as the cache builders' does
    lowered = tuple(suffix.lower() for suffix in suffixes)
    paths, images = [], []
    walked: set = set()
    for root in roots:
        for path in walk_files(root, (*suffixes, *image_extensions, *DEFAULT_IMAGE_EXTENSIONS), visited=walked):
            (paths if path.lower().endswith(lowered) else images).append(path)
    sources = {suffix: sidecar_sources(images, suffix, image_extensions) for suffix in suffixes}
    reports = {suffix: SuffixReport(suffix) for suffix in suffixes}
    for path in tqdm(paths, unit="file", desc="inspecting", disable=not show_progress, dynamic_ncols=True):
        # the longest matching suffix, so ".img_sdvae" is not taken for a shorter one that it ends with
        suffix = max((s for s in suffixes if path.lower().endswith(s.lower())), key=len)
        inspect_sidecar(path, suffix, reports[suffix], sources[suffix], caption_suffix)
    return {"roots": list(roots),
            "suffixes": {suffix: report.as_dict() for suffix, report in reports.items() if report.count}}


def broken_count(result: dict) -> int:
    """How many sidecars the report found that training cannot use: unreadable, NaN/Inf or an odd shape."""
    return sum(report["status"]["unreadable"] + report["non_finite_count"] + len(report["odd_shape_files"])
               for report in result["suffixes"].values())


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _listed(items: list[str], total: int) -> list[str]:
    lines = [f"    {item}" for item in items[:FILES_SHOWN]]
    if total > FILES_SHOWN:
        lines.append(f"    ... and {total - FILES_SHOWN} more")
    return lines


def render_text(result: dict) -> str:
    if not result["suffixes"]:
        return "no sidecars found under " + ", ".join(result["roots"])
    lines = []
    for suffix, report in result["suffixes"].items():
        kinds = ", ".join(f"{n} {kind.replace('_', ' ')}s" for kind, n in report["kinds"].items())
        lines.append(f"{suffix}: {report['count']} sidecars" + (f" ({kinds})" if kinds else ""))
        lines.append("  " + ", ".join(f"{status} {n}" for status, n in report["status"].items()))
        lines.append("  " + FRESH_RESTS_ON["image_latent" if report["kinds"].get("image_latent") else "text_embedding"])
        lines += _listed([f"{f['status']}: {f['path']}: {f['reason']}" for f in report["not_fresh"]],
                         len(report["not_fresh"]))
        lines.append("  dtypes: " + ", ".join(f"{dtype} {n}" for dtype, n in report["dtypes"].items()))
        lines.append("  shapes: " + ", ".join(f"{shape} {n}" for shape, n in report["shapes"].items()))
        odd = report["odd_shape_files"]
        if odd:
            lines.append(f"  {len(odd)} files differ from the usual shape {shape_text(report['usual_shape'])}:")
            lines += _listed([f"{f['path']}: {shape_text(f['shape'])}" for f in odd], len(odd))
        if report["non_finite_count"]:
            lines.append(f"  {report['non_finite_count']} files hold NaN/Inf (left out of the statistics):")
            lines += _listed([f"{f['path']}: {f['nan']} NaN, {f['inf']} Inf" for f in report["non_finite_files"]],
                             report["non_finite_count"])
        for encoder, n in report["encoders"].items():
            lines.append(f"  made by {encoder}: {n}")
        extras = {name: n for name, n in report["extras"].items() if n}
        if extras.get("files with several captions") or extras.get("mirrored latents") or extras.get("masks"):
            lines.append("  " + ", ".join(f"{name} {n}" for name, n in extras.items()))
        latent = report.get("latent")
        if latent:
            lines.append(f"  latent channels over {latent['files']} files: mean {_numbers(latent['channel_mean'])}, "
                         f"std {_numbers(latent['channel_std'])}")
            factor = latent["suggested_scaling_factor"]
            lines.append(f"  all values: mean {latent['mean']:.4f}, std {latent['std']:.4f} -> suggested VAE "
                         f"scaling factor {factor:.5f}" if factor else "  all values are equal: no scaling factor")
        norms = report.get("embedding_token_norms")
        if norms:
            lines.append(f"  token embedding norms over {norms['tokens']} tokens in {norms['files']} files: "
                         f"mean {norms['mean']:.4f}, std {norms['std']:.4f}, min {norms['min']:.4f}, "
                         f"max {norms['max']:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m cachetrain.inspect",
                            description="Report what a cache of sidecars holds, without loading encoders. "
                                        "Also: 'validate DIR --model M' (decode each latent, compare with its "
                                        "image), 'compare A B' (two tensor files), 'show FILE --model M' (a latent "
                                        "as an image); each with --help.",
                            epilog="Exit status: 0 when every sidecar can be trained on; 1 when any is unreadable, "
                                   "holds NaN/Inf or has an odd shape (stale ones and orphans are reported, not "
                                   "counted: the cache scripts rebuild or prune them); 2 for a folder not found.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders to walk")
    parser.add_argument("--suffix", nargs="+", action="extend", default=None,
                        help=f"sidecar suffixes to take (default: {' '.join(KNOWN_SUFFIXES)})")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="extensions of the images the latents were made from (as given to the cache builder)")
    parser.add_argument("--caption_suffix", "--txt_suffix", dest="caption_suffix", default=None,
                        help="the caption of x.jpg is x<caption_suffix> (default: the suffix each text sidecar "
                             "records, else .txt; the original T5 scripts' captions are .txtqs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for machines)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in cache_tools.TOOLS:  # validate / compare / show: the original's cache-utils
        return cache_tools.main(argv)
    args = build_parser().parse_args(argv)
    try:
        result = inspect_cache(args.dirs, args.suffix, show_progress=not args.no_progress,
                               image_extensions=tuple(args.extensions), caption_suffix=args.caption_suffix)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    broken = broken_count(result)
    if broken:
        print(f"{broken} sidecars cannot be trained on (unreadable, NaN/Inf or an odd shape)", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
