"""Shared fixtures: one offline tiny Qwen2.5-VL checkpoint per test session, and small images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from iadgpt.model import init_model

    return init_model(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from iadgpt.model import load_processor

    return load_processor(tiny_checkpoint)


@pytest.fixture()
def random_image():
    rng = np.random.default_rng(1234)

    def make(height: int = 112, width: int | None = None) -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (height, width or height, 3), dtype=np.uint8))

    return make
