"""YAML settings into typed dataclasses, with key=value overrides."""

from __future__ import annotations

import pytest

from iadgpt.config import ConfigError, load_config
from iadgpt.training.config import TrainConfig


def test_yaml_and_nested_overrides_are_typed(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("stage: 2\nlearning_rate: 1e-5\nmixed_precision: no\nlora:\n  r: 8\n")
    cfg = load_config(TrainConfig, path, ["lora.enabled=true", "global_batch_size=16", "iadgpt={exemplar_retention: 0.4}",
                                          "model=runs/2024"])
    assert cfg.stage == 2 and cfg.learning_rate == 1e-5 and cfg.mixed_precision == "no"
    assert cfg.lora.enabled is True and cfg.lora.r == 8 and cfg.global_batch_size == 16
    assert cfg.iadgpt == {"exemplar_retention": 0.4}
    assert cfg.model == "runs/2024"  # a string field stays the string typed, not the number 2024


@pytest.mark.parametrize("override, message", [
    ("learnin_rate=1", "unknown key 'learnin_rate'; did you mean 'learning_rate'"),
    ("lora.rank=4", r"override lora.rank: unknown key 'rank'"),
    ("global_batch_size=many", "expected an integer, got 'many'"),
    ("mixed_precision=fp8", r"'fp8' is not one of \['no', 'bf16', 'fp16'\]"),
    ("stage.sub=1", "'stage' has no sub-keys"),
    ("stage", "is not of the form key=value"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_missing_file_and_unknown_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        load_config(TrainConfig, tmp_path / "bad.yaml")
