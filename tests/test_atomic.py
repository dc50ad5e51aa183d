"""Weights files written in one rename: the new file whole, or the old one untouched, and no stray temporary."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cachetrain.atomic import write_tensors_atomically


def test_a_tensors_file_is_written_whole_with_its_metadata_and_nothing_beside_it(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.float16)}
    write_tensors_atomically(path, tensors, {"format": "pt", "note": "x"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"old": torch.zeros(2)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="non contiguous"):
        write_tensors_atomically(path, {"new": torch.zeros(4, 4).t()})  # safetensors refuses a strided view
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
