"""TempNetConfig: defaults are valid and every bad value names its field.

The fields: docs/tempnet_math.md section 2.6."""
import pytest

from megatron_tempnet.config import ConfigError
from megatron_tempnet.tempnet import TempNetConfig


def test_defaults_are_the_papers_gpt2_run():
    cfg = TempNetConfig().validate()
    assert (cfg.rho, cfg.tau_min, cfg.tau_max, cfg.hidden_size, cfg.dropout) == \
        (8.0, 0.5, 5.0, 256, 0.5)
    assert cfg.input_convention == "raw" and cfg.lr_schedule == "constant"
    assert cfg.loss_mode == "ce" and cfg.training_mode == "scratch"  # TempNet off by default


@pytest.mark.parametrize("field,value", [
    ("tau_min", 0.0), ("tau_min", -1.0), ("tau_min", 6.0), ("hidden_size", 0),
    ("hidden_size", 2.5), ("dropout", 1.0), ("dropout", -0.1), ("rho", -1.0),
    ("rho", float("nan")), ("input_convention", "centered"), ("lr", -1e-4),
    ("weight_decay", -0.1), ("lr_schedule", "cosine"),
])
def test_bad_value_names_its_field(field, value):
    with pytest.raises(ConfigError, match=rf"TempNetConfig\.{field} \(--tempnet-"):
        TempNetConfig(**{field: value}).validate()


def test_tau_max_not_above_tau_min_is_rejected():
    with pytest.raises(ConfigError, match="tau_min.*must be < tau_max"):
        TempNetConfig(tau_min=2.0, tau_max=2.0).validate()


def test_loss_modes_and_which_carry_tempnet():
    expected = {"ce": False, "dro_fixed_tau": False, "tempnet_dro": True, "dro_exact": False,
                "tempnet_ce": True}
    for mode, has_head in expected.items():
        assert TempNetConfig(loss_mode=mode).validate().uses_tempnet == has_head, mode
    with pytest.raises(ConfigError, match=r"loss_mode.*'dro_exact', 'tempnet_ce'"):
        TempNetConfig(loss_mode="dro").validate()
