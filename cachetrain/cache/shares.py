"""Which share of the files this process caches: across machines (--shard I/N) and across the
processes of one torchrun / accelerate launch, each on its own GPU. Shares are disjoint and
together cover every file once.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def process_shard() -> tuple[int, int]:
    """This process's (rank, world size) when started by torchrun or accelerate launch, else (0, 1)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return rank, world


def process_device(requested: str | None) -> torch.device:
    """--device if given; else this process's own GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N), checked; None -> (0, 1). Combined with the process rank by ``effective_shard``."""
    if not text:
        return 0, 1
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard wants I/N such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return index, count


def effective_shard(machine_shard: tuple[int, int], process: tuple[int, int] | None = None) -> tuple[int, int]:
    """Combine --shard (across machines) with the process rank (within one): disjoint, covering."""
    machine_index, machine_count = machine_shard
    rank, world = process if process is not None else process_shard()
    return machine_index * world + rank, machine_count * world


def take_shard(items: list[str], shard_index: int, shard_count: int) -> list[str]:
    """Every N-th item from the I-th: shares are disjoint, cover the list, and differ in size by at most one."""
    return items[shard_index::shard_count]


def launch_group():
    """torch.distributed with the gloo group of this torchrun / accelerate launch started (once), or None
    when this process was not started by a launcher (or by tests that set only RANK / WORLD_SIZE)."""
    _rank, world = process_shard()
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        # Shares take hours on large trees and finish at different times: wait as long as it takes.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return dist


def gather_from_processes(value) -> list | None:
    """Every process's ``value`` (picklable), in rank order, in every process; None when not launched."""
    dist = launch_group()
    if dist is None:
        return None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on_exit_status(status: int) -> int:
    """Under torchrun / accelerate launch: wait for every process, and give all of them the worst status.

    torchrun stops the other processes as soon as one exits non-zero, so a process that finished
    its share with a few bad files would otherwise kill the others mid-run (or the main process while it
    merges the data index).
    """
    dist = launch_group()
    if dist is None:
        return status
    worst = torch.tensor([status])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    return int(worst[0])


def per_process_path(path: str | None) -> str | None:
    """Processes of one launch must not share a report file: add the rank when there are several."""
    rank, world = process_shard()
    return f"{path}.rank{rank}" if path and world > 1 else path
