"""The order of a run's data: which samples each process trains on, row by row, epoch after epoch.

An epoch is cut into rows of ``batch_size`` samples (one process's micro-batch) in an order that is a
function of (seed, epoch) and the data alone. The rows of the whole run form one stream, epoch after
epoch; each micro-step the P processes take the next P rows, process r the r-th of them. So a run
resumed at a row rebuilds the exact order, whatever number of processes it now has (elastic resume):
what the processes of all starts together trained is the stream's rows, each once.
"""

from __future__ import annotations

import hashlib

import torch

from .objective import sample_key

BALANCES = ("pooled", "equal", "round_robin", "weighted")


def draw_generator(seed: int, epoch: int, *parts) -> torch.Generator:
    """A generator for one named draw of one epoch, independent of every other draw."""
    return torch.Generator().manual_seed(sample_key(seed, epoch, "/".join(str(p) for p in parts)))


class EpochOrder:
    """Which samples each process trains on, batch by batch, in each epoch: a function of
    (seed, epoch) and the data alone, so a resumed run rebuilds it exactly.

    - ``buckets`` (one number per sample, e.g. its latent shape; None: all alike): each batch holds
      one bucket. Each bucket's members are shuffled per epoch and cut into batches; the bucket's
      remainder (fewer than a batch) sits the epoch out, a different remainder each epoch.
    - ``groups`` (one number per sample, its data root) with ``balance="equal"``: every group gives
      the same number of draws to each epoch, as many as the largest group has samples; a smaller
      group is drawn again in a fresh order each pass (a repeat gets noise of its own). ``pooled``
      draws every sample once per epoch. ``weighted``: group g gives ``group_draws[g]`` draws
      (data_folders.folder_draws), in fresh passes the same way; fewer draws than members take a
      different subset each epoch.
    - ``groups`` with ``balance="round_robin"`` (the original scripts' rule): each group is its own
      stream of batches (passes over the group, each freshly shuffled, its remainder left out), and
      the epoch takes one batch from each group in turn, as many rounds as the smallest group has
      batches. A larger group carries on in the next epoch where it stopped. One bucket only.
    - The batches are shuffled and the first ``rows_per_epoch`` of them are the epoch's rows; process
      r takes rows r, r + P, ... (``epoch``; across epochs and starts with another P: ``RunBatches``).
      ``epoch_rows`` fixes that count (a resumed run keeps its checkpoint's); by default it is every
      whole batch, rounded down to a multiple of P: disjoint, equal shares.
    Each entry is (sample, draw): ``draw`` keys the sample's noise (the sample itself on its first
    draw of the epoch).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 buckets=None, groups=None, balance: str = "pooled", group_draws: list[int] | None = None,
                 epoch_rows: int | None = None):
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        if (balance == "weighted") != (group_draws is not None):
            raise ValueError("group_draws go with balance 'weighted' (and it needs them)")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.balance = rank, world_size, balance
        self._epoch_rows = epoch_rows
        self.bucket_of = (torch.zeros(num_samples, dtype=torch.int32) if buckets is None
                          else torch.as_tensor(list(buckets) if not isinstance(buckets, torch.Tensor) else buckets,
                                               dtype=torch.int32))
        self.group_of = (torch.zeros(num_samples, dtype=torch.int32) if groups is None or balance == "pooled"
                         else torch.as_tensor(list(groups), dtype=torch.int32))
        if len(self.bucket_of) != num_samples or len(self.group_of) != num_samples:
            raise ValueError("one bucket and one group per sample")
        self.num_buckets = int(self.bucket_of.max()) + 1 if num_samples else 0
        self.bucket_sizes = torch.bincount(self.bucket_of.long(), minlength=self.num_buckets)
        members = [torch.nonzero(self.group_of == g).flatten()
                   for g in range(int(self.group_of.max()) + 1 if num_samples else 0)]
        self.group_ids = [g for g, m in enumerate(members) if len(m)]  # groups with samples
        self.group_members = [members[g] for g in self.group_ids]
        if group_draws is not None and len(group_draws) < len(members):
            raise ValueError("one number of draws per group")
        self.group_draws = ([int(group_draws[g]) for g in self.group_ids] if group_draws is not None
                            else [max(len(m) for m in self.group_members)] * len(self.group_members)
                            if self.group_members else [])

    def bucket_members(self, bucket: int) -> torch.Tensor:
        return torch.nonzero(self.bucket_of == bucket).flatten()

    def draws_per_epoch(self) -> int:
        if self.balance == "pooled":
            return self.num_samples
        if self.balance == "round_robin":
            return self.rounds_per_epoch() * len(self.group_members) * self.batch_size
        return sum(self.group_draws)

    def rounds_per_epoch(self) -> int:
        """round_robin: the batches the smallest group holds (each round takes one from every group)."""
        return min(len(m) for m in self.group_members) // self.batch_size if self.group_members else 0

    def whole_rows(self) -> int:
        """Whole batches every epoch holds (the same in every epoch)."""
        b = self.batch_size
        if self.balance == "round_robin":
            return self.rounds_per_epoch() * len(self.group_members)
        if self.balance == "pooled":
            return int((self.bucket_sizes // b).sum())
        if self.num_buckets == 1:
            return self.draws_per_epoch() // b
        # which bucket each repeat falls in varies by epoch: the count every epoch reaches
        return max(0, (self.draws_per_epoch() - self.num_buckets * (b - 1)) // b)

    def rows_per_epoch(self) -> int:
        """Rows (batches of all processes together) each epoch trains: fixed for the whole run."""
        if self._epoch_rows is not None:
            return self._epoch_rows
        return self.whole_rows() // self.world_size * self.world_size

    def set_rows_per_epoch(self, rows: int) -> None:
        """Keep a resumed run's rows per epoch (its checkpoint's), whatever the process count now."""
        self._epoch_rows = rows

    def batches_per_epoch(self) -> int:
        """Batches of each process per epoch (rounded down where the rows do not share evenly)."""
        return self.rows_per_epoch() // self.world_size

    def _draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples, draw keys) of one epoch, before shuffling."""
        if self.balance == "pooled":
            samples = torch.arange(self.num_samples)
            return samples, samples
        samples, draws = [], []
        for g, (members, count) in enumerate(zip(self.group_members, self.group_draws)):
            passes = -(-count // len(members))
            keys = torch.rand((passes, len(members)), generator=draw_generator(self.seed, epoch, "group", g))
            order = keys.argsort(dim=1).flatten()[:count]  # a fresh permutation per pass
            pass_number = torch.arange(count) // len(members)
            chosen = members[order]
            samples.append(chosen)
            draws.append(chosen + pass_number * self.num_samples)
        return torch.cat(samples), torch.cat(draws)

    def _round_robin_rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples [n, B], draws [n, B]) of one round_robin epoch, group after group in each round.

        Group g's stream is pass after pass over it, pass q shuffled by (seed, q, g); epoch e takes the
        stream's batches [e k, (e + 1) k), k the rounds per epoch. A sample met in two passes within
        one epoch gets a draw key of its own in each."""
        b, rounds = self.batch_size, self.rounds_per_epoch()
        group_rows, group_draws = [], []
        for g, members in enumerate(self.group_members):
            per_pass = len(members) // b
            numbers = torch.arange(epoch * rounds, (epoch + 1) * rounds)
            passes = numbers // per_pass
            first_pass = int(passes[0])
            shuffled = {q: members[torch.rand(len(members), generator=draw_generator(self.seed, q, "round_robin", g)
                                              ).argsort()][: per_pass * b].view(per_pass, b)
                        for q in passes.unique().tolist()}
            rows = torch.stack([shuffled[int(q)][int(n % per_pass)] for q, n in zip(passes, numbers)])
            group_rows.append(rows)
            group_draws.append(rows + (passes - first_pass).view(-1, 1) * self.num_samples)
        # round t: group 0's batch t, group 1's batch t, ...
        return (torch.stack(group_rows, dim=1).reshape(-1, b), torch.stack(group_draws, dim=1).reshape(-1, b))

    def epoch_rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The rows of one epoch, every process's: (samples [n, B], draws [n, B], bucket of each row)."""
        used = self.rows_per_epoch()
        if self.balance == "round_robin":
            rows, row_draws = self._round_robin_rows(epoch)
            return rows[:used], row_draws[:used], [0] * min(used, len(rows))
        b = self.batch_size
        samples, draws = self._draws(epoch)
        # the seeding of the earliest versions: their single-process orders stay as they were
        shuffle = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        samples, draws = samples[shuffle], draws[shuffle]
        by_bucket = torch.sort(self.bucket_of[samples], stable=True)
        samples, draws = samples[by_bucket.indices], draws[by_bucket.indices]
        counts = torch.bincount(by_bucket.values.long(), minlength=self.num_buckets).tolist()
        rows, row_draws, row_buckets, start = [], [], [], 0
        for bucket, count in enumerate(counts):
            whole = count // b
            rows.append(samples[start : start + whole * b].view(whole, b))
            row_draws.append(draws[start : start + whole * b].view(whole, b))
            row_buckets += [bucket] * whole
            start += count
        rows, row_draws = torch.cat(rows), torch.cat(row_draws)
        if self.num_buckets > 1:
            mix = torch.randperm(len(rows), generator=draw_generator(self.seed, epoch, "batches"))
            rows, row_draws, row_buckets = rows[mix], row_draws[mix], [row_buckets[i] for i in mix.tolist()]
        return rows[:used], row_draws[:used], row_buckets[:used]

    def epoch(self, epoch: int) -> tuple[list[int], torch.Tensor, torch.Tensor, list[int]]:
        """This process's batches of one epoch started afresh: (row numbers in the epoch, samples [n, B],
        draws [n, B], bucket of each batch). Row numbers are global (the same on every process)."""
        rows, row_draws, row_buckets = self.epoch_rows(epoch)
        mine = list(range(self.rank, self.batches_per_epoch() * self.world_size, self.world_size))
        return mine, rows[mine], row_draws[mine], [row_buckets[i] for i in mine]


def order_identity(order: EpochOrder) -> dict[str, str]:
    """What the order adds to a checkpoint's data identity beyond the pairs' names: which samples share a
    bucket (a latent re-cached at another shape under its old name moves to another aspect bucket, and
    the order with it), and a weighted order's draws per folder."""
    identity = {"buckets_sha256": hashlib.sha256(order.bucket_of.numpy().tobytes()).hexdigest()[:16]}
    if order.balance == "weighted":
        identity["folder_draws"] = ",".join(map(str, order.group_draws))
    return identity


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch of ``num_samples`` alike samples (see EpochOrder).

    Incomplete trailing batches are dropped so every optimizer step sees full, equal batches and
    every process takes the same number of steps.
    """
    _numbers, samples, _draws, _buckets = EpochOrder(num_samples, batch_size, seed, rank, world_size).epoch(epoch)
    return samples.tolist()


class RunBatches:
    """This process's batches from a given (epoch, row) on, epoch after epoch, as keys
    (epoch, row number, bucket, samples, draws) for ``RefillingBatchReader``.

    ``start_row`` is where the run stands in the epoch: the rows all processes consumed so far. The
    rows are one stream across epochs: each micro-step the P processes take the next P rows, so when P
    does not divide an epoch's rows, a micro-step spans the end of one epoch and the start of the next.
    One sampler for the whole run keeps the DataLoader's workers alive across epochs.
    """

    def __init__(self, order: EpochOrder, start_epoch: int = 0, start_row: int = 0, epochs: int | None = None):
        self.order = order
        self.start_epoch, self.start_row, self.epochs = start_epoch, start_row, epochs

    def __iter__(self):
        order = self.order
        per_epoch = order.rows_per_epoch()
        if per_epoch == 0:
            return
        epoch, row = self.start_epoch, self.start_row + order.rank
        held_epoch, held = None, None
        while True:
            epoch, row = epoch + row // per_epoch, row % per_epoch
            if self.epochs is not None and epoch >= self.start_epoch + self.epochs:
                return
            if held_epoch != epoch:
                held_epoch, held = epoch, order.epoch_rows(epoch)
            samples, draws, buckets = held
            yield epoch, row, buckets[row], samples[row].tolist(), draws[row].tolist()
            row += order.world_size
