"""Optimizers, LR schedules, and stochastic rounding for bf16 weights.

Every optimizer here can skip a step on the device: set ``optimizer.found_inf`` to a 0-dim tensor
(1.0 = the gradients hold NaN/Inf) before ``step()`` and the step leaves weights and state as they
were, without the host ever reading the flag. torch's fused AdamW honours the same attribute.

``--bf16_weights`` keeps weights, gradients and optimizer state in bf16. bf16 has 8 bits of
mantissa, so an update smaller than 1/256 of a weight rounds to nothing; rounding stochastically
(up with probability equal to the discarded fraction) keeps the expected value of every update.
"""

from __future__ import annotations

import torch

INT32_LOW_16_BITS_CLEARED = -65536  # 0xFFFF0000 as a signed int32


def stochastic_round_to_bf16_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 ``value`` into bf16 ``target``, rounding up or down at random in proportion.

    A bf16 number is the top 16 bits of an fp32 one: adding uniform noise in [0, 2^16) to the
    bit pattern and clearing the low 16 bits rounds up exactly with probability (low bits)/2^16.
    """
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = ((bits + noise) & INT32_LOW_16_BITS_CLEARED).view(torch.float32)
    target.copy_(rounded.view_as(target))


def _write_back(parameter: torch.Tensor, value: torch.Tensor) -> None:
    if parameter.dtype == torch.bfloat16:
        stochastic_round_to_bf16_(parameter, value)
    else:
        parameter.copy_(value)


CHUNK_ELEMENTS = 1 << 25  # per batch of tensors: bounds the fp32 temporaries (~128 MB each)


def _chunks(parameters: list[torch.Tensor]):
    """Consecutive groups of tensors of about CHUNK_ELEMENTS elements each."""
    chunk, size = [], 0
    for parameter in parameters:
        chunk.append(parameter)
        size += parameter.numel()
        if size >= CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _SkippableOptimizer(torch.optim.Optimizer):
    """Shared step: fp32 math with foreach ops over chunks of tensors, device-side skip, bf16
    stochastic write-back.

    A subclass says how to start a parameter's state and computes, for a chunk of tensors, the new
    parameters and new state values in fp32 (lists, out of place); this class writes them back,
    keeping the old values where the step is skipped. The math runs as a few multi-tensor kernels
    per chunk rather than a dozen kernels per tensor.
    """

    def _init_state(self, parameter: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(self, grads: list[torch.Tensor], params: list[torch.Tensor], states: list[dict], group: dict,
                keep: torch.Tensor | None) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(new parameters, {state name: new values}) in fp32; must not modify its inputs in place."""
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
                states = [self.state[p] for p in chunk]
                old_params = [p.float() for p in chunk]  # for fp32 parameters: p itself (hence out of place)
                new_params, new_states = self._update([p.grad.float() for p in chunk], old_params, states,
                                                      group, keep)
                for i, p in enumerate(chunk):
                    _write_back(p, self._blend(proceed, new_params[i], old_params[i]))
                    for name, values in new_states.items():
                        states[i][name].copy_(self._blend(proceed, values[i], states[i][name].float()))
        return None


class StochasticAdamW(_SkippableOptimizer):
    """AdamW whose state lives in the parameters' dtype; bf16 parameters get stochastic rounding."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, parameter, state):
        state["step"] = torch.zeros((), device=parameter.device)
        state["exp_avg"] = torch.zeros_like(parameter)
        state["exp_avg_sq"] = torch.zeros_like(parameter)

    def _update(self, grads, params, states, group, keep):
        beta1, beta2 = group["betas"]
        step = states[0]["step"] + (1.0 if keep is None else keep.to(params[0].device))  # a skip does not count
        for state in states:  # the tensors of a group always step together
            state["step"] = step
        exp_avg = torch._foreach_lerp([s["exp_avg"].float() for s in states], grads, 1 - beta1)
        exp_avg_sq = torch._foreach_mul([s["exp_avg_sq"].float() for s in states], beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        step = step.clamp(min=1)
        denominator = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denominator, (1 - beta2 ** step).sqrt())
        torch._foreach_add_(denominator, group["eps"])
        update = torch._foreach_div(exp_avg, denominator)
        torch._foreach_div_(update, 1 - beta1 ** step)
        new_params = torch._foreach_mul(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(new_params, update, alpha=-group["lr"])
        return new_params, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class StochasticLion(_SkippableOptimizer):
    """Lion (sign of an interpolated momentum); bf16 parameters get stochastic rounding."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def _init_state(self, parameter, state):
        state["exp_avg"] = torch.zeros_like(parameter)

    def _update(self, grads, params, states, group, keep):
        beta1, beta2 = group["betas"]
        momentum = [s["exp_avg"].float() for s in states]
        update = torch._foreach_lerp(momentum, grads, 1 - beta1)
        torch._foreach_sign_(update)
        new_params = torch._foreach_mul(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(new_params, update, alpha=-group["lr"])
        return new_params, {"exp_avg": torch._foreach_lerp(momentum, grads, 1 - beta2)}


def build_optimizer(name: str, parameters, learning_rate: float, betas: tuple[float, float],
                    weight_decay: float, device: torch.device, bf16_weights: bool = False) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if name == "adamw":
        if bf16_weights:
            return StochasticAdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
        # fused: one kernel for all tensors, and it skips on device when found_inf is set
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay, fused=True)
    if name == "lion":
        return StochasticLion(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    if name == "adamw8":
        if device.type != "cuda":
            raise RuntimeError("--optimizer adamw8 needs CUDA (bitsandbytes 8-bit optimizers); use adamw on CPU")
        if bf16_weights:
            raise RuntimeError("--optimizer adamw8 rounds bf16 weights to nearest, so small updates vanish; "
                               "with --bf16_weights use adamw or lion (stochastic rounding)")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("--optimizer adamw8 needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether setting ``found_inf`` makes ``step()`` skip on the device."""
    return isinstance(optimizer, _SkippableOptimizer) or (
        isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused")))


def build_lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                      min_lr_ratio: float = 0.0):
    """A transformers LR schedule; 'constant' with warm-up becomes constant_with_warmup."""
    from transformers import get_scheduler

    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    specific = {}
    if name == "cosine_with_min_lr":
        specific = {"min_lr_rate": min_lr_ratio}
    elif name == "warmup_stable_decay":
        specific = {"num_decay_steps": max(1, total_steps // 10)}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)
