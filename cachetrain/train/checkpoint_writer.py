"""Writing a run's checkpoints: the trained UNet (and its EMA) saved around the frozen parts' template,
the training state beside it, and with --save_single_file one model.safetensors. An adapter run
(--lora_type) writes the adapter instead, beside the frozen base UNet (written once per start and
hard-linked into every checkpoint, as the other frozen parts are).

A save that fails is reported in one line and returns None; training goes on (the save policy decides
when failed saves must stop the run).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from . import checkpoint as ckpt
from .adapters import AdapterSpec, write_adapter, write_base_unet
from ..checkpoint_layout import ADAPTER_EMA_COMPONENT, BASE_UNET_DIR_NAME, EMA_COMPONENT
from ..models import export
from ..cli import first_line
from .config import TrainConfig
from .ema import ema_weights
from .frozen_parts import FrozenParts
from .run_dir import KnownCheckpoints
from .start_checks import SetupError
from .training_state import TrainingState


class CheckpointWriter:
    def __init__(self, config: TrainConfig, parts: FrozenParts, adapter: AdapterSpec | None = None,
                 known: KnownCheckpoints | None = None):
        self.config = config
        self.known = known or KnownCheckpoints(config.output_dir)  # names the newest whole one when a save fails
        self.parts = parts
        self.adapter = adapter
        self.output_dir = Path(config.output_dir)
        self.base_unet_dir = self.output_dir / BASE_UNET_DIR_NAME

    def prepare(self, unet) -> None:
        """Before step 1, for an adapter run: the base UNet every checkpoint links to (SetupError if it
        cannot be written)."""
        if self.adapter is None:
            return
        try:
            write_base_unet(unet, self.base_unet_dir)
        except Exception as error:  # a full disk
            raise SetupError(f"--output_dir {self.config.output_dir}: could not write the base UNet every checkpoint "
                             f"links to ({self.base_unet_dir.name}/: {type(error).__name__}: {first_line(error)})"
                             ) from None

    def save(self, unet, step: int, state: TrainingState, ema=None, trainable=None) -> Path | None:
        """``output_dir/checkpoint-NNNNN`` of ``step``, or None when it could not be saved (said why)."""
        destination = ckpt.checkpoint_dir(self.output_dir, step)
        try:
            self.parts.write_template(unet)
            if self.adapter is None:
                ckpt.save_checkpoint(destination, unet, self.parts.frozen_dir, state,
                                     ema_weights=_ema_writer(ema, trainable, unet))
            else:
                ckpt.save_checkpoint(destination, unet, self.parts.frozen_dir, state,
                                     ema_weights=self._adapter_ema_writer(ema, trainable, unet),
                                     write_trained=lambda folder: self._write_adapter(unet, folder, step))
        except Exception as error:  # a full disk shows as OSError, RuntimeError or safetensors' own error
            newest = self.known.newest_whole()
            kept = (f"the newest saved checkpoint, {newest.name}, is intact" if newest is not None
                    else "no checkpoint of this run is saved yet")
            tqdm.write(f"[train] could not save checkpoint at step {step} "
                       f"({type(error).__name__}: {first_line(error)}); {kept}")
            return None
        self.known.saved(destination)
        self._write_single_file(destination, step, ema is not None)
        return destination

    def _write_adapter(self, unet, folder: Path, step: int) -> None:
        ckpt.link_tree(self.base_unet_dir, folder / ckpt.TRAINED_COMPONENT)
        write_adapter(unet, self.adapter, folder, kohya=self.config.save_kohya_lora,
                      title=f"{self.output_dir.resolve().name} step {step}", steps=step,
                      prediction_type=self.parts.around(unet).scheduler.config.get("prediction_type", "epsilon"))

    def _adapter_ema_writer(self, ema, trainable, unet):
        if ema is None:
            return None

        def write(folder: Path) -> None:
            with ema_weights(ema, trainable):
                write_adapter(unet, self.adapter, folder / ADAPTER_EMA_COMPONENT)

        return write

    def _write_single_file(self, checkpoint: Path, step: int, has_ema: bool) -> None:
        """--save_single_file: model.safetensors in the checkpoint (publish_final copies it beside the
        final model). A failure costs the file, not the checkpoint or the run."""
        if not self.config.save_single_file:
            return
        title = f"{self.output_dir.resolve().name} step {step}"
        try:
            export.export_single_file(checkpoint, checkpoint / export.SINGLE_FILE_NAME, ema=has_ema, steps=step,
                                      title=title)
        except Exception as error:  # a full disk shows as OSError or safetensors' own error
            tqdm.write(f"[train] could not write {checkpoint / export.SINGLE_FILE_NAME} ({type(error).__name__}: "
                       f"{first_line(error)}); the checkpoint folder itself is saved. Training goes on.")


def _ema_writer(ema, trainable, unet):
    """A function that saves the EMA weights as a UNet folder in a checkpoint, or None without EMA."""
    if ema is None:
        return None

    def write(folder: Path) -> None:
        with ema_weights(ema, trainable):
            unet.save_pretrained(folder / EMA_COMPONENT, safe_serialization=True)

    return write
