"""Optimizers, LR schedules, and stochastic rounding for bf16 weights.

Every optimizer here can skip a step on the device: set ``optimizer.found_inf`` to a 0-dim tensor
(1.0 = the gradients hold NaN/Inf) before ``step()`` and the step leaves weights and state as they
were, without the host ever reading the flag. torch's fused AdamW honours the same attribute.

``--bf16_weights`` keeps weights, gradients and optimizer state in bf16. bf16 has 8 bits of
mantissa, so an update smaller than 1/256 of a weight rounds to nothing; rounding stochastically
(up with probability equal to the discarded fraction) keeps the expected value of every update.
"""

from __future__ import annotations

import math
import sys

import torch

from .config import TrainConfig
from .config_rules import optimizer_precision_problem
from .packaged_optimizers import PACKAGED_OPTIMIZERS, OptimizerUnavailable, build_packaged_optimizer

INT32_LOW_16_BITS_CLEARED = -65536  # 0xFFFF0000 as a signed int32


def stochastic_rounded(value: torch.Tensor) -> torch.Tensor:
    """fp32 ``value`` rounded to a bf16-representable fp32 value, up or down at random in proportion.

    A bf16 number is the top 16 bits of an fp32 one: adding uniform noise in [0, 2^16) to the
    bit pattern and clearing the low 16 bits rounds up exactly with probability (low bits)/2^16.
    The result converts to bf16 exactly.
    """
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & INT32_LOW_16_BITS_CLEARED).view(torch.float32)


def stochastic_round_to_bf16_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 ``value`` into bf16 ``target``, rounding up or down at random in proportion."""
    target.copy_(stochastic_rounded(value).view_as(target))


CHUNK_ELEMENTS = 1 << 25  # per batch of tensors: bounds the fp32 working vectors (~128-190 MB each)


def _chunks(parameters: list[torch.Tensor]):
    """Groups of tensors of one dtype and device, in order, of at least CHUNK_ELEMENTS elements each
    (bar the last of a kind): a chunk closes with the tensor that reaches the size."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for parameter in parameters:
        by_kind.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for same_kind in by_kind.values():
        chunk, size = [], 0
        for parameter in same_kind:
            chunk.append(parameter)
            size += parameter.numel()
            if size >= CHUNK_ELEMENTS:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk


def _memory_order(parameter: torch.Tensor) -> list[int] | None:
    """The dims of ``parameter`` from outermost to innermost in memory; None when that is their order.

    A channels-last weight permuted this way is contiguous, so it flattens and is written back as a
    view. Its gradient and state share its layout (autograd and zeros_like keep it), so the same
    permutation lines all of them up element for element.
    """
    if parameter.is_contiguous():
        return None
    return sorted(range(parameter.dim()), key=lambda dim: -parameter.stride(dim))


def _in_memory_order(tensors: list[torch.Tensor], orders: list[list[int] | None]) -> list[torch.Tensor]:
    return [t if order is None else t.permute(order) for t, order in zip(tensors, orders)]


def _flat_fp32(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A new fp32 vector of the tensors' values back to back: one batched copy, not one per tensor."""
    return torch.cat([t.reshape(-1) for t in tensors]).float()


def _store_flat_(targets: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write an fp32 vector back into same-dtype tensors; into bf16 with stochastic rounding."""
    if targets[0].dtype == torch.bfloat16:
        flat = stochastic_rounded(flat)
    flat = flat.to(targets[0].dtype)  # exact after the rounding above
    pieces = flat.split([t.numel() for t in targets])
    torch._foreach_copy_(targets, [piece.view(t.shape) for piece, t in zip(pieces, targets)])


class _SkippableOptimizer(torch.optim.Optimizer):
    """Shared step: the math on one flat fp32 vector per chunk of tensors, device-side skip, bf16
    stochastic write-back.

    A subclass names its per-element state (``state_names``), says how to start a parameter's
    state, and computes from flat fp32 vectors (gradient, parameters, each state) the new parameters
    and new state, out of place. This class gathers and scatters the vectors, keeping the old values
    where the step is skipped. A step costs a few dozen kernels per chunk of ~32M elements, however
    many tensors the chunk holds.
    """

    state_names: tuple[str, ...] = ()

    def _init_state(self, parameter: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(self, grad: torch.Tensor, param: torch.Tensor, state: dict[str, torch.Tensor],
                tensor_states: list[dict], group: dict, keep: torch.Tensor | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(new parameters, {state name: new values}) as flat fp32 vectors; must not modify its inputs.

        ``tensor_states`` are the chunk's per-tensor state dicts, for state that is not per element."""
        raise NotImplementedError

    def _keep(self) -> torch.Tensor | None:
        """1.0 where the step proceeds, 0.0 where found_inf says skip (None: always proceed)."""
        found_inf = getattr(self, "found_inf", None)
        return None if found_inf is None else (1.0 - found_inf.float().clamp(0, 1))

    @staticmethod
    def _blend(proceed: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        # where, not lerp: a skipped step's values may be NaN, and NaN * 0 is still NaN
        return new if proceed is None else torch.where(proceed, new, old)

    @torch.no_grad()
    def step(self, closure=None):
        keep = self._keep()
        proceed = None if keep is None else keep > 0  # computed once, used by every blend
        for group in self.param_groups:
            parameters = [p for p in group["params"] if p.grad is not None]
            for p in parameters:
                if not self.state[p]:
                    self._init_state(p, self.state[p])
            for chunk in _chunks(parameters):
                tensor_states = [self.state[p] for p in chunk]
                orders = [_memory_order(p) for p in chunk]
                params = _in_memory_order(chunk, orders)
                states = {name: _in_memory_order([s[name] for s in tensor_states], orders)
                          for name in self.state_names}
                old_param = _flat_fp32(params)
                old_state = {name: _flat_fp32(values) for name, values in states.items()}
                grad = _flat_fp32(_in_memory_order([p.grad for p in chunk], orders))
                new_param, new_state = self._update(grad, old_param, old_state, tensor_states, group, keep)
                _store_flat_(params, self._blend(proceed, new_param, old_param))
                for name, values in new_state.items():
                    _store_flat_(states[name], self._blend(proceed, values, old_state[name]))
        return None


class StochasticAdamW(_SkippableOptimizer):
    """AdamW whose state lives in the parameters' dtype; bf16 parameters get stochastic rounding."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, parameter, state):
        state["step"] = torch.zeros((), device=parameter.device)
        state["exp_avg"] = torch.zeros_like(parameter)
        state["exp_avg_sq"] = torch.zeros_like(parameter)

    def _update(self, grad, param, state, tensor_states, group, keep):
        beta1, beta2 = group["betas"]
        step = tensor_states[0]["step"] + (1.0 if keep is None else keep.to(param.device))  # a skip does not count
        for tensor_state in tensor_states:  # the tensors of a chunk always step together
            tensor_state["step"] = step
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, grad, grad, value=1 - beta2)
        step = step.clamp(min=1)
        denominator = (exp_avg_sq.sqrt() / (1 - beta2 ** step).sqrt()).add_(group["eps"])
        update = exp_avg / denominator / (1 - beta1 ** step)
        new_param = torch.add(param * (1 - group["lr"] * group["weight_decay"]), update, alpha=-group["lr"])
        return new_param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class StochasticLion(_SkippableOptimizer):
    """Lion (sign of an interpolated momentum); bf16 parameters get stochastic rounding."""

    state_names = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def _init_state(self, parameter, state):
        state["exp_avg"] = torch.zeros_like(parameter)

    def _update(self, grad, param, state, tensor_states, group, keep):
        beta1, beta2 = group["betas"]
        update = torch.lerp(state["exp_avg"], grad, 1 - beta1).sign_()
        new_param = torch.add(param * (1 - group["lr"] * group["weight_decay"]), update, alpha=-group["lr"])
        return new_param, {"exp_avg": torch.lerp(state["exp_avg"], grad, 1 - beta2)}


# each optimizer's own betas and weight decay, for ours (the packaged ones keep theirs when not given)
OWN_DEFAULTS = {"adamw": ((0.9, 0.999), 0.01), "lion": ((0.9, 0.99), 0.0)}


def build_optimizer(name: str, parameters, learning_rate: float, betas: tuple[float, float] | None = None,
                    weight_decay: float | None = None, bf16_weights: bool = False,
                    initial_d: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see config.OPTIMIZERS); betas and weight decay left None are its own defaults."""
    parameters = [p for p in parameters if p.requires_grad]
    if problem := optimizer_precision_problem(name, bf16_weights):  # the rule lives with the flag rules
        raise RuntimeError(problem)
    if name in PACKAGED_OPTIMIZERS:
        try:
            return build_packaged_optimizer(name, parameters, learning_rate, betas, weight_decay, initial_d)
        except OptimizerUnavailable as error:
            raise RuntimeError(str(error)) from None
    if name not in OWN_DEFAULTS:
        raise ValueError(f"unknown optimizer {name!r}")
    own_betas, own_decay = OWN_DEFAULTS[name]
    betas = tuple(betas) if betas is not None else own_betas
    weight_decay = own_decay if weight_decay is None else weight_decay
    if name == "lion":
        return StochasticLion(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    if bf16_weights:
        return StochasticAdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    # fused: one kernel for all tensors, and it skips on device when found_inf is set
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay, fused=True)


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether setting ``found_inf`` makes ``step()`` skip on the device."""
    return isinstance(optimizer, _SkippableOptimizer) or (
        isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused")))


COSINE_SCHEDULES = ("cosine", "cosine_with_restarts", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                    "warmup_stable_decay")


def warmup_factor(step: int, warmup_steps: int) -> float:
    return step / max(1, warmup_steps)


def rex_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float = 1.0,
               min_lr_ratio: float = 0.0) -> float:
    """REX as the original scripts run it: a linear warm-up from ``start_factor`` to 1 over
    ``warmup_steps``, then from 1 down to ``min_lr_ratio`` along z / (0.1 + 0.9 z), z the fraction of
    the decay still to go (it falls slowly at first and fast at the end); the floor after the end."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    done = step - warmup_steps
    if decay_steps <= 0 or done >= decay_steps:
        return min_lr_ratio
    remaining = (decay_steps - done) / decay_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining / (0.1 + 0.9 * remaining)


def linear_with_min_lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """A linear warm-up, then a straight line from the peak down to ``min_lr_ratio`` of it."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def build_lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                      min_lr_ratio: float = 0.0, num_cycles: float | None = None, rex_start_factor: float = 1.0):
    """An LR schedule of ``total_steps`` steps: a transformers schedule by its name, or our rex and
    linear_with_min_lr. 'constant' with warm-up becomes constant_with_warmup. A schedule's step is
    whatever the caller steps it by (an optimizer step, or an epoch with --scheduler_at_epoch)."""
    import functools

    from transformers import get_scheduler

    if name == "rex":
        factor = functools.partial(rex_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                   start_factor=rex_start_factor, min_lr_ratio=min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "linear_with_min_lr":
        factor = functools.partial(linear_with_min_lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                   min_lr_ratio=min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    specific = {}
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        specific = {"min_lr_rate": min_lr_ratio}
    elif name == "warmup_stable_decay":
        specific = {"num_decay_steps": max(1, total_steps // 10)}
    if num_cycles is not None and name in COSINE_SCHEDULES:
        specific["num_cycles"] = int(num_cycles) if name == "cosine_with_restarts" else num_cycles
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)


@torch.no_grad()
def keep_top_gradients_(parameters: list[torch.Tensor], fraction: float) -> None:
    """Zero all but the largest ``fraction`` of gradient magnitudes, in place.

    The threshold is exact within each chunk of tensors (at least CHUNK_ELEMENTS elements, so one
    chunk for a small model, ~27 for SD1.5): one kthvalue over the chunk's magnitudes, then one
    masked write-back. Ties at the threshold are kept. No host sync.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    for chunk in _chunks(grads):
        flat = torch.cat([g.reshape(-1) for g in chunk])
        dropped = int(flat.numel() * (1.0 - fraction))
        if dropped == 0:
            continue
        magnitudes = flat.abs().float()
        threshold = magnitudes.kthvalue(dropped).values  # the largest of the dropped ones
        kept = torch.where(magnitudes > threshold, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
        pieces = kept.split([g.numel() for g in chunk])
        torch._foreach_copy_(chunk, [piece.view(g.shape) for piece, g in zip(pieces, chunk)])


def run_lr_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, batches_per_epoch: int, total_steps: int,
                    speaks: bool = False, processes: int = 1):
    """The run's schedule, of ``total_steps`` optimizer steps; with --scheduler_at_epoch it is stepped
    once per epoch, so its length and warm-up count epochs. ``batches_per_epoch``: the micro-batches of
    all ``processes`` together. ``speaks``: say what --scheduler constant with a warm-up does (it warms
    up), so that no flag seems ignored."""
    warmup, length = config.warmup_optimizer_steps(batches_per_epoch, processes), total_steps
    if speaks and config.scheduler == "constant" and warmup > 0:
        print(f"[train] --scheduler constant with --warmup_steps {config.warmup_steps}: the LR rises over the "
              "warm-up, then stays constant (constant_with_warmup)", file=sys.stderr)
    if config.scheduler_at_epoch:
        steps_per_epoch = batches_per_epoch / (config.gradient_accum * processes)
        warmup, length = round(warmup / steps_per_epoch), math.ceil(length / steps_per_epoch)
    return build_lr_schedule(config.scheduler, optimizer, warmup, length, config.min_lr_ratio,
                             config.num_cycles, config.rex_start_factor)
