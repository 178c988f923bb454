"""The run config: defaults, resolution, and one clear error for every kind of bad value."""
import pytest

from rekd.config import TrainConfig, read_settings_file
from rekd.errors import UsageError


def test_defaults_are_the_embedded_default_and_resolve_per_dataset():
    cfg = TrainConfig()
    assert (cfg.mode, cfg.dataset, cfg.arch) == ("baseline", "digits", "tiny")
    resolved = cfg.resolved(default_timesteps=16)
    assert resolved.timesteps == 16 and resolved.lr == 0.1 and resolved.surrogate_alpha == 2.0
    assert resolved.teacher_epochs == cfg.epochs
    assert TrainConfig(optimizer="adam").resolved(4).lr == 1e-3


@pytest.mark.parametrize("values,message", [
    ({"prune_ratio": 1.0}, "prune_ratio=1.0 is not allowed; allowed: 0 <= prune_ratio < 1"),
    ({"prune_ratio": -0.1}, "prune_ratio=-0.1"),
    ({"temperature": 0}, "temperature=0 is not allowed; allowed: a number > 0"),
    ({"alpha": 1.5}, "alpha=1.5 is not allowed; allowed: 0 <= alpha <= 1"),
    ({"confidence": 1.0}, "confidence=1.0 is not allowed"),
    ({"epochs": 0}, "epochs=0 is not allowed; allowed: an integer >= 1"),
    ({"mode": "distill"}, "mode='distill' is not allowed; allowed: baseline | sparse_kd | default_kd"),
    ({"epochs": "3"}, "epochs='3' has the wrong type; allowed: an integer"),
    ({"epochs": 2.5}, "epochs=2.5 has the wrong type"),
    ({"amp": 1}, "amp=1 has the wrong type; allowed: true or false"),
    ({"lr": "fast"}, "lr='fast' has the wrong type; allowed: a number or none"),
    ({"v_reset": 2.0}, "v_reset=2.0 must be below v_threshold=1.0"),
    ({"learning_rate": 0.1}, "unknown setting 'learning_rate'"),
    ({"kd_reduction": "mean"}, "kd_reduction='mean' is not allowed; allowed: batchmean | elementwise"),
])
def test_bad_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("|", r"\|").replace("*", r"\*")):
        TrainConfig.from_dict(values)


def test_set_strings_are_parsed_by_field_type():
    cfg = TrainConfig().with_overrides(["epochs=3", "lr=0.05", "detach_reset=true", "v_reset=none", "arch=vgg16"])
    assert (cfg.epochs, cfg.lr, cfg.detach_reset, cfg.v_reset, cfg.arch) == (3, 0.05, True, None, "vgg16")
    with pytest.raises(UsageError, match="epochs='three' has the wrong type; allowed: an integer"):
        TrainConfig().with_overrides(["epochs=three"])
    with pytest.raises(UsageError, match="expected key=value"):
        TrainConfig().with_overrides(["epochs"])
    with pytest.raises(UsageError, match="unknown setting 'foo'"):
        TrainConfig().with_overrides(["foo=1"])


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = TrainConfig(prune_ratio=0.3)
    with pytest.raises(Exception):
        cfg.prune_ratio = 0.5
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_settings_files_must_be_yaml_mappings(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 2\narch: tiny\n")
    assert read_settings_file(good) == {"epochs": 2, "arch": "tiny"}
    for text, message in (("- 1\n- 2\n", "expected a mapping"), ("a: [1\n", "not valid YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_settings_file(bad)
    with pytest.raises(UsageError, match="cannot be read"):
        read_settings_file(tmp_path / "missing.yaml")
