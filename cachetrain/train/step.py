"""One training step's device work, shared by the trainer and the GPU benchmark.

An optimizer step is ``gradient_accum`` calls of ``forward_backward`` inside ``accelerator.accumulate``
(accumulate), then, on the micro-step where accelerate syncs gradients, one ``optimizer_step``:
``prepare_update`` (norm, clip, NaN/Inf skip) and ``update`` (step, zero the gradients). Nothing here
reads a value back to the host (but for optimizers without a device-side skip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .loader import Batch
from .objective import TrainingInputs, masked_loss_weights, per_sample_loss
from .optim import keep_top_gradients_, supports_device_skip
from .telemetry import mean_abs_grad, weight_norm


def bf16_autocast(config: TrainConfig, device_type: str, *, training: bool) -> bool:
    """Whether the UNet runs under bf16 autocast: on CUDA unless --fp32 (on CPU bf16 has no fast kernels,
    6-7x slower, so fp32 there). Training with --bf16_weights does not autocast: its weights are bf16
    already. Its samples do: the parts that do not train stay fp32 beside the bf16 UNet."""
    return device_type == "cuda" and not config.fp32 and not (training and config.bf16_weights)


@dataclass
class UpdateCheck:
    grad_norm: torch.Tensor  # total gradient norm before clipping (device scalar)
    found_inf: torch.Tensor  # 1.0 when the gradients hold NaN/Inf and the update is skipped
    qk_grads: torch.Tensor | None  # mean |grad| of attention q/k weights, when asked for
    weight_norm: torch.Tensor | None = None  # L2 norm of all UNet weights, when asked for


class TrainStep:
    def __init__(self, accelerator, unet, optimizer, objective, trainable: list,
                 qk_params: list, *, vae_scale: float, text_scale: float = 1.0, gradient_clip: float = 0.0,
                 channels_last: bool = False, compile_backend: str | None = None, gradient_topk: float | None = None,
                 forced_embedding: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 loss_divisor: int = 1, masked_loss: tuple[float, bool] | None = None):
        self.accelerator = accelerator
        self.unet = unet  # as prepared by accelerate (DDP-wrapped when distributed)
        self.forward_unet = torch.compile(unet, backend=compile_backend) if compile_backend else unet
        self.optimizer = optimizer
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.device_skip = supports_device_skip(self.inner_optimizer)
        self.objective = objective
        self.trainable = trainable
        self.qk_params = qk_params
        self.vae_scale = vae_scale
        self.text_scale = text_scale
        self.gradient_clip = gradient_clip
        self.channels_last = channels_last
        self.dtype = accelerator.unwrap_model(unet).dtype
        self.gradient_topk = gradient_topk
        self.loss_divisor = loss_divisor  # --scale_loss_with_accum: --gradient_accum, on top of accelerate's own
        self.masked_loss = masked_loss  # (unmasked weight, normalize) with --masked_loss
        self.forced_embedding = None  # --force_txtcache: one ([1, T, D] embedding, [1, T] mask or None) for all
        if forced_embedding is not None:
            embedding, mask = forced_embedding
            self.forced_embedding = (embedding.to(accelerator.device).float(),
                                     None if mask is None else mask.to(accelerator.device))

    def _predict(self, batch: Batch, unet) -> tuple[torch.Tensor, TrainingInputs]:
        """(prediction, objective's inputs) for a batch: the one place a batch becomes UNet inputs."""
        device = self.accelerator.device
        latents = batch.latents.to(device, non_blocking=True).float() * self.vae_scale
        mask = batch.attention_mask  # None unless some captions were padded (T5 sidecars)
        if self.forced_embedding is not None:
            embedding, forced_mask = self.forced_embedding
            embeddings = embedding.expand(latents.shape[0], -1, -1)
            mask = None if forced_mask is None else forced_mask.expand(latents.shape[0], -1)
        else:
            embeddings = batch.embeddings.to(device, non_blocking=True).float()
        context = (embeddings * self.text_scale).to(self.dtype)
        noise = batch.noise.to(device, non_blocking=True)
        draws = batch.timesteps.to(device, non_blocking=True)
        if batch.perturbation is None:
            inputs = self.objective.training_inputs(latents, noise, draws)
        else:  # --ip_noise_gamma
            inputs = self.objective.training_inputs(latents, noise, draws,
                                                    batch.perturbation.to(device, non_blocking=True))
        if batch.loss_weights is not None:  # each sample's folder loss weight (--dataset_config)
            inputs.weights = inputs.weights * batch.loss_weights.to(device, non_blocking=True)
        noisy = inputs.noisy.to(self.dtype)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if mask is not None:
            mask = mask.to(device, non_blocking=True)
        with self.accelerator.autocast():
            prediction = unet(noisy, inputs.timesteps, context, encoder_attention_mask=mask).sample
        return prediction, inputs

    def cell_weights(self, batch: Batch) -> torch.Tensor | None:
        """[B, 1, h, w] loss weights from the batch's masks (--masked_loss), on the device; None without."""
        if self.masked_loss is None or batch.masks is None:
            return None
        unmasked_weight, normalize = self.masked_loss
        return masked_loss_weights(batch.masks.to(self.accelerator.device, non_blocking=True), unmasked_weight,
                                   normalize)

    def forward_backward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of one micro-batch; returns the (weighted, raw) loss as device scalars."""
        prediction, inputs = self._predict(batch, self.forward_unet)
        loss, raw_loss = self.objective.losses_for(prediction, inputs, self.cell_weights(batch))
        if self.loss_divisor != 1:
            loss = loss / self.loss_divisor
        self.accelerator.backward(loss)
        return loss, raw_loss

    @torch.no_grad()
    def held_out_errors(self, batch: Batch) -> torch.Tensor:
        """Per-sample raw MSE of the (unwrapped, eval-mode) UNet on a held-out batch (weighted by its masks with
        --masked_loss); no gradients."""
        unet = self.accelerator.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        try:
            prediction, inputs = self._predict(batch, unet)
        finally:
            unet.train(was_training)
        return per_sample_loss(prediction, inputs.target, "mse", cell_weights=self.cell_weights(batch))

    def prepare_update(self, want_qk_grads: bool) -> UpdateCheck:
        """At the synced micro-step: gradient norm (clipped when --gradient_clip > 0), the NaN/Inf skip, then
        --gradient_topk (after the norm, so NaN/Inf is still seen); at logging steps (``want_qk_grads``)
        also the q/k gradients and the weight norm."""
        qk_grads = mean_abs_grad(self.qk_params) if want_qk_grads else None
        norm = weight_norm(list(self.accelerator.unwrap_model(self.unet).parameters())) if want_qk_grads else None
        if self.gradient_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.gradient_clip).float()
        else:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.gradient_topk is not None and self.gradient_topk < 1:
            keep_top_gradients_(self.trainable, self.gradient_topk)
        if self.device_skip:
            self.inner_optimizer.found_inf = found_inf
        elif found_inf.item():  # an optimizer without a device-side skip: one host sync per step
            for p in self.trainable:
                p.grad = None
        return UpdateCheck(grad_norm, found_inf, qk_grads, norm)

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, want_qk_grads: bool) -> UpdateCheck:
        """The update of one optimizer step, at the micro-step where accelerate synced the gradients:
        clip (and check), then step."""
        check = self.prepare_update(want_qk_grads)
        self.update()
        return check
