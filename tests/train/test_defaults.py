"""Defaults name hub repositories that exist, from one place in the package."""

from pathlib import Path

from cachetrain.models import loading as models
from tests.conftest import REPO_ROOT

TAKEN_DOWN = "runwayml/stable-diffusion-v1-5"  # removed from the hub in 2024


def test_sd15_defaults_name_the_maintained_repository():
    import create_img_sdvae
    import create_img_sdxl

    assert models.SD15_MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert create_img_sdvae.DEFAULTS.model == models.SD15_MODEL_ID
    assert create_img_sdxl.DEFAULTS.model == models.SDXL_MODEL_ID
    assert f'MODEL="${{MODEL:-{models.SD15_MODEL_ID}}}"' in (REPO_ROOT / "train_sd.sh").read_text()


def test_no_file_names_the_taken_down_repository_as_a_default():
    offenders = []
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("*.sh"), REPO_ROOT / "README.md",
                 *(REPO_ROOT / "cachetrain").glob("*.py")]:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if TAKEN_DOWN in line and "taken down" not in line:
                offenders.append(f"{path.name}:{number}")
    assert offenders == []


def test_a_bad_flag_is_one_line_with_exit_status_2(capsys):
    import pytest

    from cachetrain.train.config import parse_train_args

    with pytest.raises(SystemExit) as stopped:
        parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--optimizer", "sgd"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--optimizer" in err[0] and "sgd" in err[0]
