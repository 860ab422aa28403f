"""The `iadgpt` command line."""

from __future__ import annotations

import json

import pytest

from iadgpt.cli import main


def test_init_model_through_the_cli(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--preset", "tiny", "--seed", "1"]) == 0
    assert "random-weight Qwen2.5-VL (tiny)" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_unknown_preset_and_command_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown preset 'huge'; allowed: qwen2.5-vl-32b, qwen2.5-vl-3b, qwen2.5-vl-72b, qwen2.5-vl-7b, small, tiny"):
        main(["init-model", str(tmp_path / "m"), "--preset", "huge"])
    with pytest.raises(SystemExit):
        main(["fly"])
