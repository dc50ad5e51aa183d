"""LoHa/LoKr files in LyCORIS' layout with values no run or merge can use: refused in one line naming the file and
the layer or key, status 2, before a run's step 1 (not a run that trains on loss=nan, not a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cachetrain.commands import lora as lora_command
from cachetrain.models.lora_files import adaptable_layers, kohya_name
from cachetrain.train.trainer import main
from tests.models.test_lora_tools import _lycoris_file, _unet
from tests.train.test_adapters import sd15_cached, sd15_model  # noqa: F401 (fixtures)
from tests.training_support import train_args

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.1.resnets.0.conv1"


def _faulty_file(sd15_model: Path, folder: Path, fault: str) -> tuple[str, Path, str]:
    """(kind, file, what the refusal says): a LyCORIS file of two layers with one fault in to_q."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    kind = "lokr" if fault == "inf" else "loha"
    module_class = LokrModule if kind == "lokr" else LohaModule
    layers = adaptable_layers(_unet(sd15_model))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        modules = {name: module_class(name, layers[name], 1.0, lora_dim=4, alpha=2) for name in (TO_Q, CONV)}
        for module in modules.values():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    file = _lycoris_file(modules, folder / f"{fault.replace(' ', '-')}.safetensors")
    tensors, stem = load_file(file), kohya_name(TO_Q)
    if fault == "nan alpha":
        tensors[f"{stem}.alpha"] = torch.tensor(float("nan"))
        message = f"{file}: {stem}.alpha holds NaN or infinite values"
    elif fault == "inf":  # named by the file's own key, not PEFT's name for it
        factor = next(key for key in tensors if key.startswith(f"{stem}.lokr_w1"))
        tensors[factor].view(-1)[0] = float("inf")
        message = f"{file}: {factor} holds NaN or infinite values"
    elif fault == "ranks":  # w1_b of rank 2 against w1_a of rank 4
        tensors[f"{stem}.hada_w1_b"] = tensors[f"{stem}.hada_w1_b"][:2].clone()
        message = f"{file}: {stem} "
    else:  # an alpha of two values
        tensors[f"{stem}.alpha"] = torch.tensor([2.0, 2.0])
        message = f"{file}: {stem}.alpha holds 2 values, not one"
    save_file(tensors, file)
    return kind, file, message


@pytest.mark.parametrize("fault", ["nan alpha", "inf", "ranks", "alpha"])
def test_a_faulty_lycoris_start_is_refused_in_one_line_before_step_1(sd15_model, sd15_cached, tmp_path, capsys,
                                                                      fault):
    kind, file, message = _faulty_file(sd15_model, tmp_path, fault)
    output = tmp_path / "run"
    capsys.readouterr()
    status = main(train_args(sd15_model, sd15_cached, output, "--lora_type", kind, "--lora_weights", str(file),
                             "--batch_size", "4", "--max_steps", "2", "--log_every", "1"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and "loss=nan" not in err
    assert not list(output.glob("checkpoint-*")) and not (output / "tensorboard").exists()


def test_a_lycoris_alpha_of_two_values_is_refused_by_merge_in_one_line(sd15_model, tmp_path, capsys):
    _, file, message = _faulty_file(sd15_model, tmp_path, "alpha")
    capsys.readouterr()
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(file), "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()
