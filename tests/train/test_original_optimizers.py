"""The original scripts' optimizer names (adamw8, opt_lion, py_lion, d_lion, --initial_d) and the
learning-rate-free ones (prodigy, schedulefree): each built from its package with its own defaults,
each stepping, and each stopped and resumed to the weights of a run that never stopped."""

from __future__ import annotations

import pytest
import torch

from cachetrain.train.config import ConfigError, parse_train_args
from cachetrain.train.optim import build_optimizer
from cachetrain.train.trainer import train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights

REQUIRED = ["--pretrained_model", "m", "--train_data_dir", "d"]
# the package class each name means, as the original scripts (and kohya/OneTrainer users) know them
PACKAGE_CLASSES = {"opt_lion": ("optimi", "Lion"), "py_lion": ("lion_pytorch", "Lion"),
                   "d_lion": ("dadaptation", "DAdaptLion"), "prodigy": ("prodigyopt", "Prodigy"),
                   "schedulefree": ("schedulefree", "AdamWScheduleFree")}
LR_FREE = {"d_lion", "prodigy"}  # their LR is a multiplier of the step size they estimate


def _parameters():
    return [torch.nn.Parameter(torch.randn(4, 3))]


@pytest.mark.parametrize("name", sorted(PACKAGE_CLASSES))
def test_each_original_optimizer_name_is_its_package_class_with_its_own_defaults(name):
    module, class_name = PACKAGE_CLASSES[name]
    optimizer = build_optimizer(name, _parameters(), 1.0 if name in LR_FREE else 1e-4)
    assert type(optimizer).__module__.split(".")[0] == module and type(optimizer).__name__ == class_name
    own = type(optimizer)(_parameters(), lr=1.0)  # the package's defaults (betas, weight decay, ...)
    if hasattr(own, "train"):
        own.train()  # schedule-free: built in the mode it steps in
    settings = [{key: value for key, value in o.param_groups[0].items() if key not in ("params", "lr")}
                for o in (optimizer, own)]
    assert settings[0] == settings[1]


def test_betas_weight_decay_and_initial_d_given_reach_the_optimizer():
    optimizer = build_optimizer("d_lion", _parameters(), 1.0, (0.95, 0.98), 0.1, initial_d=1e-4)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["d"]) == ((0.95, 0.98), 0.1, 1e-4)
    prodigy = build_optimizer("prodigy", _parameters(), 1.0, initial_d=2e-5)
    assert prodigy.param_groups[0]["d"] == 2e-5


def test_lion_and_adamw_without_betas_or_weight_decay_get_their_own_defaults():
    lion = build_optimizer("lion", _parameters(), 1e-4)
    adamw = build_optimizer("adamw", _parameters(), 1e-4)
    assert (lion.defaults["betas"], lion.defaults["weight_decay"]) == ((0.9, 0.99), 0.0)
    assert (adamw.defaults["betas"], adamw.defaults["weight_decay"]) == ((0.9, 0.999), 0.01)
    config = parse_train_args([*REQUIRED, "--optimizer", "py_lion"])
    assert (config.betas, config.weight_decay) == (None, None)  # not given: nothing is passed


def test_initial_d_with_an_optimizer_that_has_no_d_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--initial_d applies to --optimizer d_lion or prodigy, not adamw"):
        parse_train_args([*REQUIRED, "--optimizer", "adamw", "--initial_d", "1e-5"])
    with pytest.raises(ConfigError, match="--bf16_weights needs --optimizer adamw or lion"):
        parse_train_args([*REQUIRED, "--optimizer", "prodigy", "--bf16_weights"])


@pytest.mark.parametrize("name", sorted(PACKAGE_CLASSES))
def test_each_optimizer_stopped_and_resumed_equals_a_run_that_never_stopped(tiny_sd_model, cached_dataset,
                                                                             tmp_path, name):
    # 48 pairs, batch 4, accumulation 2: the stop after 7 micro-batches finishes step 4 and saves it;
    # both runs save at step 4 (--save_steps 2), so schedule-free switches its weights there in both
    lr = ["--learning_rate", "1.0"] if name in LR_FREE else ["--learning_rate", "1e-3"]
    common = ("--batch_size", "4", "--gradient_accum", "2", "--max_steps", "6", "--log_every", "1",
              "--save_steps", "2", "--optimizer", name, *lr)
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common)),
                    interrupt_after_batches=7)
    assert stopped.interrupted and stopped.steps == 4
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                           "--resume")))
    assert resumed.steps == 6
    assert _logged(stopped, "train/loss") + _logged(resumed, "train/loss") == _logged(straight, "train/loss")
    start = _unet_weights(tiny_sd_model)
    a = _unet_weights(tmp_path / "straight" / "checkpoint-00006")
    b = _unet_weights(tmp_path / "resumed" / "checkpoint-00006")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], start[key]) for key in a)  # it trained
