"""Metrics by defect kind and type, against scikit-learn on the same pixels and scores."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from iadgpt.evaluation.by_kind import run_metrics_by_defect, run_metrics_by_kind

SIZE = 8


class MaskTable:
    """The benchmark's ground truth, reduced to what the metrics ask of it."""

    def __init__(self, masks: dict[str, np.ndarray]):
        self.masks = masks

    def mask(self, path: Path) -> np.ndarray:
        return self.masks[str(path)]


def make_category(seed: int = 0):
    """Three normal images, two scratches, one hole, one in-context defect; maps on the full grid
    (upsampling an 8x8 map to 8x8 is the identity, so sklearn sees the very same pixels)."""
    rng = np.random.default_rng(seed)
    names = {"n0": ("normal", "good"), "n1": ("normal", "good"), "n2": ("normal", "good"),
             "s0": ("local", "scratch"), "s1": ("local", "scratch"), "h0": ("local", "hole"),
             "c0": ("in_context", "color")}
    queries, records, masks = [], {}, {}
    for name, (kind, _) in names.items():
        queries.append(SimpleNamespace(image_path=Path(name)))
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        if kind == "local":
            row, col = rng.integers(0, SIZE - 2, size=2)
            mask[row:row + 2, col:col + 3] = True
        masks[name] = mask
        records[name] = {"score": float(rng.random()), "token_map": (rng.random((SIZE, SIZE)) + mask).tolist()}
    classes = {name: kind for name, (kind, _) in names.items()}
    defects = {name: defect for name, (_, defect) in names.items()}
    return queries, records, classes, defects, MaskTable(masks)


def reference_auroc(records, masks, chosen: list[str]) -> tuple[float, float]:
    """Image AUROC of `chosen` (defect = any masked pixel) and pixel AUROC over their pooled pixels,
    the maps min-max normalised over the normal and local images (a rank-preserving step)."""
    labels = [int(masks.mask(Path(n)).any()) for n in chosen]
    image = roc_auc_score(labels, [records[n]["score"] for n in chosen])
    pixels = np.concatenate([masks.mask(Path(n)).ravel() for n in chosen])
    values = np.concatenate([np.asarray(records[n]["token_map"]).ravel() for n in chosen])
    return image, roc_auc_score(pixels, values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_defect_type_is_scored_against_the_same_normals(seed):
    queries, records, classes, defects, truth = make_category(seed)
    result = run_metrics_by_defect(queries, records, str, classes, defects, truth)
    assert set(result) == {"hole/image_auroc", "hole/pixel_auroc", "scratch/image_auroc", "scratch/pixel_auroc"}
    for defect, images in (("scratch", ["s0", "s1"]), ("hole", ["h0"])):
        image, pixel = reference_auroc(records, truth, ["n0", "n1", "n2"] + images)
        assert result[f"{defect}/image_auroc"] == pytest.approx(image)
        assert result[f"{defect}/pixel_auroc"] == pytest.approx(pixel)


def test_types_together_give_the_kind_metrics():
    queries, records, classes, defects, truth = make_category(3)
    kind = run_metrics_by_kind(queries, records, str, classes, truth)
    image, pixel = reference_auroc(records, truth, ["n0", "n1", "n2", "s0", "s1", "h0"])
    assert kind["image_auroc_local"] == pytest.approx(image)
    assert kind["pixel_auroc"] == pytest.approx(pixel)
    # A category whose only local defect is one type: the type's numbers are the kind's.
    single = [q for q in queries if str(q.image_path) != "h0"]
    by_type = run_metrics_by_defect(single, records, str, classes, defects, truth)
    by_kind = run_metrics_by_kind(single, records, str, classes, truth)
    assert by_type["scratch/image_auroc"] == pytest.approx(by_kind["image_auroc_local"])
    assert by_type["scratch/pixel_auroc"] == pytest.approx(by_kind["pixel_auroc"])


def test_a_category_without_local_defects_has_no_types():
    queries, records, classes, defects, truth = make_category(4)
    only_normal_and_in_context = [q for q in queries if classes[str(q.image_path)] != "local"]
    assert run_metrics_by_defect(only_normal_and_in_context, records, str, classes, defects, truth) == {}
