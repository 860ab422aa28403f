"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from toy_stages import write_stage


@pytest.fixture()
def toy_stage(tmp_path):
    write_stage(tmp_path / "stage3", tmp_path / "images")
    return tmp_path / "stage3"
