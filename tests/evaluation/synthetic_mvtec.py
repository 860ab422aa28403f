"""A tiny MVTec-AD-layout dataset drawn with numpy: products, defects and their masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 84, 112
"""Small and not square, so the evaluation shape's aspect handling is exercised (84x112 -> 192x256)."""


def _product(category: str, rng: np.random.Generator) -> np.ndarray:
    """A normal part: a disc on a gradient, or a striped tile, with sensor noise."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    if category == "disc":
        base = 60 + 0.8 * cols
        base = np.where((rows - HEIGHT / 2) ** 2 + (cols - WIDTH / 2) ** 2 < 30 ** 2, 170, base)
    else:
        base = 110 + 50 * np.sin(cols / 4.0)
    image = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_mvtec(root: Path, categories=("disc", "tile"), train: int = 4, test_good: int = 3, defects: int = 3,
                seed: int = 0) -> Path:
    """<root>/<cat>/{train/good, test/good, test/scratch, ground_truth/scratch} as in MVTec-AD."""
    rng = np.random.default_rng(seed)
    for category in categories:
        folder = Path(root) / category
        for index in range(train):
            _save(_product(category, rng), folder / "train" / "good" / f"{index:03d}.png")
        for index in range(test_good):
            _save(_product(category, rng), folder / "test" / "good" / f"{index:03d}.png")
        for index in range(defects):
            image = _product(category, rng)
            mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
            top, left = rng.integers(5, HEIGHT - 25), rng.integers(5, WIDTH - 25)
            mask[top:top + 14, left:left + 20] = 255
            image[mask > 0] = (20, 20, 20)
            _save(image, folder / "test" / "scratch" / f"{index:03d}.png")
            _save(mask, folder / "ground_truth" / "scratch" / f"{index:03d}_mask.png")
    return Path(root)


def write_folder_dataset(root: Path, good: int = 5, defects: int = 2, seed: int = 1) -> Path:
    """The plain folder layout (no train split): <root>/widget/{good, dent, masks/dent}."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "widget"
    for index in range(good):
        _save(_product("disc", rng), folder / "good" / f"{index:03d}.png")
    for index in range(defects):
        image = _product("disc", rng)
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        mask[10:30, 10:40] = 255
        image[mask > 0] = 0
        _save(image, folder / "dent" / f"{index:03d}.png")
        _save(mask, folder / "masks" / "dent" / f"{index:03d}.png")
    return Path(root)
