"""snce_fast.train.config: TrainConfig.validate names the bad setting (SettingError), and the
requirement can be rendered with a front end's names for the settings."""
from __future__ import annotations

import pytest

from snce_fast.train import SettingError, TrainConfig


@pytest.mark.parametrize(
    "change, setting, message",
    [
        ({"n_latents": 0}, "n_latents", "n_latents=0 is invalid: expected a positive int"),
        ({"k": 0}, "k", "k=0 is invalid: expected 1 <= k <= n_latents (4096)"),
        ({"k": 5000}, "k", "1 <= k <= n_latents (4096)"),
        ({"hook": "layer:x"}, "hook", "'output' or 'layer:N'"),
        ({"epochs": 0}, "epochs", "epochs=0 is invalid"),
        ({"batch_size": True}, "batch_size", "expected a positive int"),
        ({"max_steps": -1}, "max_steps", "max_steps=-1"),
        ({"lr": 0.0}, "lr", "expected a positive finite float"),
        ({"lr": float("inf")}, "lr", "lr=inf is invalid: expected a positive finite float"),
        ({"aux_coef": -1.0}, "aux_coef", "expected a finite float >= 0"),
        ({"aux_coef": float("inf")}, "aux_coef", "aux_coef=inf is invalid"),
        ({"aux_coef": "x"}, "aux_coef", "aux_coef='x' is invalid"),
        ({"adam_eps": 0.0}, "adam_eps", "expected a positive finite float"),
        ({"adam_eps": float("inf")}, "adam_eps", "adam_eps=inf is invalid"),
        ({"b_dec_init": "bogus"}, "b_dec_init", "b_dec_init='bogus' is invalid"),
        ({"encoder_backward": "x"}, "encoder_backward", "expected one of"),
    ],
)
def test_validate_names_the_setting(change, setting, message):
    cfg = TrainConfig(**change)
    with pytest.raises(SettingError) as info:
        cfg.validate()
    assert isinstance(info.value, ValueError)
    assert info.value.setting == setting and info.value.value == change[setting]
    assert message in str(info.value)


def test_requirement_renders_other_settings_with_the_callers_names():
    with pytest.raises(SettingError) as info:
        TrainConfig(n_latents=48, k=49).validate()
    assert info.value.describe(lambda name: "--" + name.replace("_", "-")) == "expected 1 <= k <= --n-latents (48)"


def test_validate_normalises_hook_and_defaults_lr():
    cfg = TrainConfig(hook=" layer:3 ", n_latents=2**14)
    cfg.validate()
    assert cfg.hook == "layer:3" and cfg.learning_rate == pytest.approx(2e-4)
    assert TrainConfig(lr=1e-3).learning_rate == 1e-3
