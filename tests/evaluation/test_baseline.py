"""The training-free nearest-patch baseline."""

from __future__ import annotations

import numpy as np
from PIL import Image

from iadgpt.evaluation.baseline import NearestPatchBaseline, nearest_patch_distance, patch_descriptors


def product(rng, spot=None):
    pixels = np.full((96, 96, 3), 120, np.uint8) + rng.integers(0, 6, (96, 96, 3), dtype=np.uint8)
    if spot:
        y, x = spot
        pixels[y:y + 14, x:x + 14] = (240, 40, 40)
    return Image.fromarray(pixels)


def test_nearest_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    query, bank = rng.normal(size=(5, 7, 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
    expected = np.sqrt(((query[:, :, None, :] - bank[None, None]) ** 2).sum(-1)).min(-1)
    np.testing.assert_allclose(nearest_patch_distance(query, bank), expected, rtol=1e-4, atol=1e-4)


def test_defect_scores_higher_and_is_localised():
    rng = np.random.default_rng(1)
    baseline = NearestPatchBaseline()
    references = [product(rng) for _ in range(2)]
    normal_score, _ = baseline(product(rng), references)
    defect_score, heatmap = baseline(product(rng, spot=(60, 20)), references)
    assert defect_score > 2 * normal_score
    assert heatmap.shape == (96, 96)
    assert heatmap[60:74, 20:34].mean() > 3 * heatmap[:40, 50:].mean()
    assert patch_descriptors(product(rng)).shape[:2] == (15, 15)
    assert baseline(product(rng), [])[0] == 0.0
