"""Bad training pairs: what every pair of a run must be, and the ledger of those passed over.

The loader's workers check each pair (loader.PairChecks) and replace a bad one from the rest; the
training process keeps the ledger here: it names each bad file once, counts them, and stops the run
when no batch can be filled or more than --max_bad_fraction of the pairs read were bad.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from .loader import PairChecks
from ..sidecar import IMAGE_LATENT_KEY, TEXT_EMBEDDING_KEY
from ..tree import PairIndex, read_tensor_shape

REFERENCE_PAIRS = 16  # without buckets, the run's shapes are the commonest among the first pairs' headers
MIN_PAIRS_FOR_BAD_FRACTION = 200  # --max_bad_fraction is judged over at least this many reads


class TrainingError(RuntimeError):
    """A problem with the run's inputs or setup, stated for the user."""


def examples(bad: list[tuple[str, str]] | dict[str, str], count: int = 3) -> str:
    """A few (path: reason) of the bad files, for a message."""
    items = list(bad.items() if isinstance(bad, dict) else bad)
    return "; ".join(f"{path}: {reason}" for path, reason in items[:count])


def reference_shapes(index: PairIndex, with_latent: bool) -> PairChecks:
    """What every pair of the run must be, from the headers of the first pairs alone (millions of
    files are never all opened at start): the commonest latent shape (ties: the first) and text width."""
    latents, widths, unreadable = {}, {}, []
    for i in range(min(REFERENCE_PAIRS, len(index))):
        latent_path, text_path = index[i]
        for path, key, counts, pick in ((latent_path, IMAGE_LATENT_KEY, latents, tuple),
                                        (text_path, TEXT_EMBEDDING_KEY, widths, lambda shape: shape[-1])):
            if (path == latent_path and not with_latent) or path is None:  # None: image-only data
                continue
            try:
                shape = read_tensor_shape(path, key)
                counts[pick(shape)] = counts.get(pick(shape), 0) + 1
            except (OSError, ValueError) as error:
                unreadable.append((path, str(error)))
    if (with_latent and not latents) or (not widths and index.text_suffix is not None):
        raise TrainingError(f"none of the first {min(REFERENCE_PAIRS, len(index))} pairs could be read, e.g. "
                            f"{examples(unreadable)}; check the cache (python -m cachetrain.inspect)")
    commonest = lambda counts: max(counts, key=counts.get) if counts else None  # noqa: E731  (first wins ties)
    return PairChecks(latent_shape=commonest(latents), text_width=commonest(widths))


@dataclass
class BadPairLedger:
    """The bad pairs one process passed over since this start."""

    max_bad_fraction: float
    aspect_buckets: bool
    skipped: int = 0  # bad pairs passed over
    tried: int = 0  # pairs read (good and bad), for --max_bad_fraction
    named: dict[str, str] = field(default_factory=dict)  # path -> reason of the bad files named (once each)

    def record(self, batch) -> None:
        """Name each bad file of ``batch`` once and count it; stop when the batch could not be filled
        or too many pairs were bad."""
        self.tried += batch.tried
        self.skipped += batch.skipped
        for path, reason in batch.bad:
            if path not in self.named:
                self.named[path] = reason
                tqdm.write(f"[train] skipped {path}: {reason}", file=sys.stderr)
        if batch.latents is None:
            raise TrainingError(f"no pair could be read for a batch: all {batch.tried} pairs tried were bad, e.g. "
                                f"{examples(batch.bad)}; check the cache (python -m cachetrain.inspect)")
        limit = self.max_bad_fraction
        # judged over at least MIN_PAIRS_FOR_BAD_FRACTION reads, so a few bad files early on are no
        # verdict; but as many bad as that many reads may hold stops the run at once
        if self.skipped > limit * max(self.tried, MIN_PAIRS_FOR_BAD_FRACTION):
            raise TrainingError(f"{self.skipped} of the {self.tried} pairs read were bad (more than "
                                f"--max_bad_fraction {limit}), e.g. {examples(self.named)}; fix or remove "
                                f"them (python -m cachetrain.inspect lists them all){self._buckets_hint()}")

    def _buckets_hint(self) -> str:
        if self.aspect_buckets or not any("the run's is" in reason for reason in self.named.values()):
            return ""
        return "; a cache of several sizes on purpose trains with --aspect_buckets"
