"""cachetrain-inspect validate / compare / show: the original cache-utils, driven through the real command."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from cachetrain import sidecar
from cachetrain.commands import create_img_sdvae, inspect


@pytest.fixture(scope="module")
def trained_vae_model(tmp_path_factory):
    from cachetrain.tiny.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("trained-vae") / "model", seed=0, trained_vae=True)


@pytest.fixture
def cached_part(_shapes_template, trained_vae_model, tmp_path):
    """One folder of the synthetic images, cached at 32 px with the trained tiny VAE (fp32 latents)."""
    root = tmp_path / "data"
    shutil.copytree(_shapes_template / "part0", root)
    assert create_img_sdvae(["--model", str(trained_vae_model), "--data_root", str(root), "--resolution", "32",
                             "--save_dtype", "float32", "--num_workers", "0", "--no_progress"]) == 0
    return root


def test_validate_passes_a_cache_made_from_its_images_and_names_a_latent_of_another_image(
        cached_part, trained_vae_model, capsys):
    capsys.readouterr()
    assert inspect(["validate", str(cached_part), "--model", str(trained_vae_model)]) == 0
    out, err = capsys.readouterr()
    latents = sorted(cached_part.glob("*.img_sdvae"))
    assert out.count("ok   ") == len(latents) and "0 failed" in err
    lowest = min(float(line.split()[-3]) for line in out.splitlines())

    swapped_into = latents[1]
    shutil.copyfile(latents[0], swapped_into)  # the latent of another image under this image's name
    assert inspect(["validate", str(cached_part), "--model", str(trained_vae_model)]) == 1
    out, err = capsys.readouterr()
    (failed,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert str(swapped_into) in failed and "1 failed" in err
    assert float(failed.split()[-3]) < min(20.0, lowest)


def test_compare_reports_the_largest_difference_of_two_tensor_files_and_agrees_within_atol(cached_part, capsys):
    first, second = sorted(cached_part.glob("*.img_sdvae"))[:2]
    half = cached_part / "half.safetensors"
    latent = sidecar.read_sidecar(first, "latent")
    from safetensors.torch import save_file

    save_file({"latent": latent.half()}, str(half))
    capsys.readouterr()
    assert inspect(["compare", str(first), str(first)]) == 0
    assert "the files agree" in capsys.readouterr().err
    assert inspect(["compare", str(first), str(second)]) == 1
    out = capsys.readouterr().out
    expected = float((sidecar.read_sidecar(second, "latent") - latent).abs().max())
    assert f"max abs difference {expected:.3g}" in out
    assert inspect(["compare", str(first), str(half)]) == 1
    assert inspect(["compare", str(first), str(half), "--atol", "1e-2"]) == 0
    assert inspect(["compare", str(first), str(cached_part / "missing")]) == 1


def test_show_writes_each_latent_decoded_as_its_preview_or_into_out(cached_part, trained_vae_model, tmp_path, capsys):
    from cachetrain.view.cache_tools import decode_to_pixels, load_bare_or_pipeline_vae

    first = sorted(cached_part.glob("*.img_sdvae"))[0]
    assert inspect(["show", str(first), "--model", str(trained_vae_model)]) == 0
    expected = decode_to_pixels(load_bare_or_pipeline_vae(str(trained_vae_model), False),
                                sidecar.read_sidecar(first, "latent")).permute(1, 2, 0).numpy()
    with Image.open(sidecar.preview_path(first)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    assert inspect(["show", str(first), "--model", str(trained_vae_model), "--out", str(tmp_path / "views")]) == 0
    assert (tmp_path / "views" / (first.name + ".webp")).is_file()
    assert inspect(["show", str(first), "--model", str(tmp_path / "nothing")]) == 2
    assert "cannot load a VAE" in capsys.readouterr().err
