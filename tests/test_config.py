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


@pytest.mark.parametrize("overrides, message", [
    (["max_steps=-3"], r"^config: max_steps=-3 must be >= 1 \(or unset: `epochs` decides\)$"),
    (["save_every=0"], r"^config: save_every=0 must be >= 1$"),
    (["keep_checkpoints=0"], r"^config: keep_checkpoints=0 must be >= 1$"),
    (["learning_rate=0"], r"^config: learning_rate=0.0 must be a finite number > 0$"),
    (["learning_rate=.nan"], r"^config: learning_rate=nan must be a finite number > 0$"),
    (["warmup_ratio=1"], r"^config: warmup_ratio=1.0 must be in \[0, 1\)$"),
    (["epochs=0", "num_workers=-1"], r"^config: epochs=0.0 must be a finite number > 0; num_workers=-1 must be >= 0$"),
    (["max_minutes=0"], r"^config: max_minutes=0.0 must be a finite number > 0 \(or unset: no time limit\)$"),
    (["stage=4"], r"^config: stage=4 must be 1, 2 or 3$"),
    (["global_batch_size=6", "per_device_batch_size=4"],
     r"^config: global_batch_size=6 is not a multiple of per_device_batch_size=4$"),
    (["fit_steps_to_minutes=true"], "fit_steps_to_minutes=true needs max_minutes"),
    (["lora.r=0", "lora.dropout=1"], r"^config.lora: r=0 must be >= 1; dropout=1.0 must be in \[0, 1\)$"),
])
def test_settings_out_of_range_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)


def test_iadgpt_settings_are_overridden_by_key_and_typed(tmp_path):
    """Groups stay partial (they are merged key by key into the model's settings when it loads)."""
    path = tmp_path / "stage.yaml"
    path.write_text("iadgpt:\n  exemplar_retention: 0.2\n  residuals:\n    tokens: true\n")
    cfg = load_config(TrainConfig, path, ["iadgpt.exemplar_retention=0.5", "iadgpt.pixel_loss_weight=1e-3",
                                          "iadgpt.residuals.scores=true", "iadgpt.vision_fusion_layers=[2, 4]",
                                          "iadgpt.detection_question.defect_answer=No"])
    assert cfg.iadgpt == {"exemplar_retention": 0.5, "residuals": {"tokens": True, "scores": True},
                          "pixel_loss_weight": 1e-3, "vision_fusion_layers": [2, 4],
                          "detection_question": {"defect_answer": "No"}}
    assert isinstance(cfg.iadgpt["pixel_loss_weight"], float)


@pytest.mark.parametrize("overrides, yaml_text, message", [
    (["iadgpt.exemplar_retentoin=0.5"], "",
     r"override iadgpt.exemplar_retentoin: unknown key 'exemplar_retentoin'; did you mean 'exemplar_retention'"),
    ([], "iadgpt:\n  pixel_los_weight: 2\n",
     r"stage.yaml.iadgpt: unknown key 'pixel_los_weight'; did you mean 'pixel_loss_weight'"),
    (["iadgpt.residuals.tokens=maybe"], "", r"iadgpt.residuals.tokens: expected true or false, got 'maybe'"),
    (["iadgpt.residuals.tokns=true"], "", r"override iadgpt.residuals.tokns: unknown key 'tokns'; did you mean 'tokens'"),
    ([], "iadgpt:\n  in_context_residuals: true\n", r"stage.yaml.iadgpt: 'in_context_residuals' is now 'residuals.tokens'"),
    (["iadgpt.compress_exemplars=false"], "",
     r"override iadgpt.compress_exemplars: 'compress_exemplars' is now 'exemplar_retention \(1.0 keeps every"),
    (["iadgpt.exemplar_retention.x=1"], "", "'exemplar_retention' has no sub-keys"),
])
def test_unknown_or_mistyped_iadgpt_settings_are_refused(tmp_path, overrides, yaml_text, message):
    path = tmp_path / "stage.yaml"
    path.write_text(yaml_text or "stage: 3\n")
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, path, overrides)


def test_an_iadgpt_override_reaches_the_model(tiny_checkpoint):
    from iadgpt.model import load_model

    cfg = load_config(TrainConfig, None, ["iadgpt.exemplar_retention=0.5"])
    assert load_model(tiny_checkpoint, iadgpt=cfg.iadgpt).iadgpt.exemplar_retention == 0.5


def test_train_py_says_what_is_wrong_in_one_line(capsys):
    import runpy
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    recipe = runpy.run_path(str(repo / "train" / "train.py"))
    config = repo / "configs" / "stage3.yaml"
    with pytest.raises(SystemExit) as exit_:
        recipe["main"](["--config", str(config), "max_steps=-3"])
    assert exit_.value.code == f"train.py: {config}: max_steps=-3 must be >= 1 (or unset: `epochs` decides)"
