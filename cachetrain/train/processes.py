"""The processes of one run: the accelerator they train under, the check that a launch of N processes
trains as N, and the collectives the trainer uses to agree (a flag, a sum, the end-of-run shares).
Each is one collective that every process must reach at the same point: at start, at saves, at
logging steps and at the end, never at an ordinary step. (The stop/trigger agreement is the save
policy's: save_policy.agreed_requests.)
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Callable

import torch

from .bad_data import TrainingError
from .config import TrainConfig
from .step import bf16_autocast


# how long the processes of a finished run may take to shut down together before each leaves on its own
SHUTDOWN_GRACE_SECONDS = 60.0


def check_process_count(launched_world: int, accelerator_world: int) -> None:
    """A launch that asked for N processes must train as N, not as N independent copies."""
    if launched_world > 1 and accelerator_world != launched_world:
        raise TrainingError(f"launched as {launched_world} processes but training sees {accelerator_world}: "
                            "each would train alone on all the data. On CPU, torchrun needs the accelerator "
                            "in CPU mode (this trainer does that when no GPU is visible); check the launcher.")


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_cuda = torch.cuda.is_available()
    autocast = bf16_autocast(config, "cuda" if use_cuda else "cpu", training=True)
    accelerator = Accelerator(mixed_precision="bf16" if autocast else "no",
                              gradient_accumulation_steps=config.gradient_accum, cpu=not use_cuda)
    check_process_count(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    # the same seed on every process: stochastic rounding must draw alike so weights stay identical
    set_seed(config.seed)
    if use_cuda and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (one all-reduce with several processes)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item())


def sum_over_processes(accelerator, value: float) -> torch.Tensor:
    """``value`` summed over every process, as a device scalar (one all-reduce with several processes)."""
    total = torch.tensor(float(value), device=accelerator.device)
    return accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total


def weights_checksum(unet: torch.nn.Module) -> torch.Tensor:
    """One float64 number per process that differs if the processes' weights differ."""
    with torch.no_grad():
        tensors = [p.detach().double() for p in unet.parameters()]
        norms = torch.stack(torch._foreach_norm(tensors))
        weights = torch.arange(1, len(tensors) + 1, dtype=torch.float64, device=norms.device)
        return (norms * weights).sum()


def gather_shares(accelerator, unet: torch.nn.Module, sample_id_sum: int, sample_count: int,
                  skipped: int) -> tuple[list[float], torch.Tensor]:
    """(every process's weights checksum, a [processes, 3] tensor of its sample id sum, sample count and
    bad pairs skipped): what the summary shows to prove the processes trained alike on different pairs."""
    device = accelerator.device
    checksum = weights_checksum(unet).reshape(1).to(device)
    shares = torch.tensor([float(sample_id_sum), float(sample_count), float(skipped)],
                          dtype=torch.float64, device=device).reshape(1, 3)
    return accelerator.gather(checksum).cpu().tolist(), accelerator.gather(shares).cpu()


def end_processes(accelerator, exit_status: int, grace_seconds: float = SHUTDOWN_GRACE_SECONDS,
                  release: Callable[[], None] | None = None) -> None:
    """Wait for every process, then tear the process group down. By now the run's files are written and
    its exit status is known, so a teardown that hangs (destroying a process group now and then does,
    with no error) must not hold the job: after ``grace_seconds`` the process leaves with that status.
    ``release`` drops the caller's references to the DDP-wrapped model first, so that its reducer is freed
    here, under the watchdog: freed later (when the run object goes), it joined gloo's threads with the
    group gone and hung there for good (seen on a two-node run)."""
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return
    watchdog = threading.Timer(grace_seconds, _leave, args=(exit_status, grace_seconds))
    watchdog.daemon = True
    watchdog.start()
    try:
        accelerator.wait_for_everyone()
        if release is not None:
            release()
        accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
        gc.collect()
        accelerator.end_training()
    finally:
        watchdog.cancel()


def _leave(exit_status: int, grace_seconds: float) -> None:
    print(f"[train] the processes did not shut down together within {grace_seconds:.0f} s; leaving with "
          f"status {exit_status} (the run's files were written before)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(exit_status)
