"""Metrics library: scikit-learn cross-checks, hand-computed cases, and a brute-force AUPRO reference."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from iadgpt.evaluation import (
    aupro,
    f1_max,
    image_metrics,
    normalize_per_category,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
    summarize_over_seeds,
)
from iadgpt.evaluation import metrics as metrics_module

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def brute_force_f1_max(labels, scores):
    """F1 at every threshold 'score >= t', by counting: independent of scikit-learn."""
    labels = np.asarray(labels, dtype=bool)
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def brute_force_aupro(masks, maps, max_fpr, structure=np.ones((3, 3))):
    """AUPRO straight from the definition, threshold by threshold, region by region.

    Regions: scipy.ndimage.label with a 3x3 structure (8-connectivity), as in MVTec's reference
    (`structure` lets a test show that another connectivity gives another number).
    Integration: MVTec's `trapezoid(x, y, x_max)` logic (bisect + linear interpolation).
    """
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        regions += [(image_index, labelled == k) for k in range(1, count + 1)]
    normal_scores = np.concatenate([m[~mask] for mask, m in zip(masks, maps)])
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        fprs.append(np.mean(normal_scores >= threshold))
        pros.append(np.mean([np.mean(maps[i][region] >= threshold) for i, region in regions]))
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if max_fpr not in x:
        ins = bisect.bisect(x, max_fpr)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (max_fpr - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (max_fpr - x[ins - 1])
    keep = x <= max_fpr
    return (np.trapezoid(y[keep], x[keep]) + correction) / max_fpr


def random_masks_and_maps(rng, count=6, shape=(16, 20), score_step=0.1):
    """Masks with a few rectangular defects (some images defect-free), noisy maps with ties."""
    masks, maps = [], []
    for index in range(count):
        mask = np.zeros(shape, dtype=bool)
        if index % 3 != 0:  # every third image is defect-free
            for _ in range(rng.integers(1, 4)):
                top, left = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
                height, width = rng.integers(1, 5), rng.integers(1, 5)
                mask[top:top + height, left:left + width] = True
        signal = mask * rng.uniform(0.2, 1.0)
        noisy = signal + rng.normal(0.0, 0.35, shape)
        masks.append(mask)
        maps.append(np.round(noisy / score_step) * score_step)  # quantised: many tied scores
    return masks, maps


# ---------------------------------------------------------------------------------------------
# image level
# ---------------------------------------------------------------------------------------------


def test_image_metrics_match_sklearn_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.7 + rng.normal(0, 0.6, 300), 1)  # rounding creates ties
    result = image_metrics(labels, scores)
    assert set(result) == {"image_auroc", "image_ap", "image_f1max"}
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_f1max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    assert 0.6 < result["image_auroc"] < 0.95  # the data is informative but not separable


def test_f1_max_hand_computed():
    # threshold 0.8 : TP=1 FP=0 -> P=1,   R=1/2, F1=2/3
    # threshold 0.4 : TP=1 FP=1 -> P=1/2, R=1/2, F1=1/2
    # threshold 0.35: TP=2 FP=1 -> P=2/3, R=1,   F1=2*(2/3)/(5/3)=4/5   <- maximum
    # threshold 0.1 : TP=2 FP=2 -> P=1/2, R=1,   F1=2/3
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert f1_max(labels, scores) == pytest.approx(0.8)
    assert image_metrics(labels, scores)["image_f1max"] == pytest.approx(0.8)
    # AUROC by hand: positive/negative pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3/4
    assert image_metrics(labels, scores)["image_auroc"] == pytest.approx(0.75)


def test_f1_max_is_exact_despite_dropping_intermediate_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = rng.integers(0, 2, 200)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(0, 1, 200) + 0.5 * labels, 1)
        precision, recall, _ = precision_recall_curve(labels, scores, drop_intermediate=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1_all_points = np.nan_to_num(2 * precision * recall / (precision + recall))
        assert f1_max(labels, scores) == pytest.approx(f1_all_points.max(), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_ap_and_auroc_match_sklearn_across_random_cases(seed):
    rng = np.random.default_rng(100 + seed)
    size = int(rng.integers(5, 400))
    labels = rng.random(size) < rng.uniform(0.05, 0.6)
    labels[:2] = [False, True]
    scores = np.round(labels * rng.uniform(0, 2) + rng.normal(0, 1, size), int(rng.integers(0, 3)))
    result = image_metrics(labels, scores)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_f1max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)


def test_image_metrics_perfect_and_inverted_scores():
    labels = [0, 0, 0, 1, 1]
    perfect = image_metrics(labels, [0.1, 0.2, 0.3, 0.8, 0.9])
    assert perfect == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1max": 1.0}
    assert image_metrics(labels, [0.9, 0.8, 0.7, 0.2, 0.1])["image_auroc"] == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [True, True]])
def test_image_metrics_single_class_gives_nan(labels):
    result = image_metrics(labels, np.linspace(0, 1, len(labels)))
    assert set(result) == {"image_auroc", "image_ap", "image_f1max"}
    assert all(math.isnan(value) for value in result.values())
    assert math.isnan(f1_max(labels, np.linspace(0, 1, len(labels))))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.5], "2 entries"),
        ([0, 2], [0.5, 0.6], r"labels\[1\] = 2"),
        ([0, 1], [0.5, float("nan")], r"scores\[1\]"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_metrics_bad_input_raises(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_metrics(labels, scores)


# ---------------------------------------------------------------------------------------------
# pixel level
# ---------------------------------------------------------------------------------------------


def test_pixel_metrics_match_sklearn_on_flattened_pixels_of_mixed_sizes():
    rng = np.random.default_rng(2)
    masks, maps = random_masks_and_maps(rng, count=5, shape=(16, 20))
    extra_mask, extra_map = random_masks_and_maps(rng, count=2, shape=(9, 11))  # other image size
    masks, maps = masks + extra_mask, maps + extra_map
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    result = pixel_metrics(masks, maps)
    assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    assert result["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert pixel_auroc(masks, maps) == result["pixel_auroc"]


def test_rank_auroc_equals_sklearn_with_and_without_ties():
    rng = np.random.default_rng(5)
    labels = rng.random(5000) < 0.1
    continuous = (rng.random(5000) + 0.4 * labels).astype(np.float32)
    tied = np.round(continuous * 4) / 4  # five score levels: most pairs tie
    for scores in (continuous, tied, np.ones(5000)):
        assert metrics_module.rank_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics_module.rank_auroc(labels, np.ones(5000)) == 0.5
    assert metrics_module.rank_auroc(labels, labels.astype(float)) == 1.0


def test_pixel_metrics_accept_stacked_arrays_and_0_255_masks():
    rng = np.random.default_rng(3)
    masks, maps = random_masks_and_maps(rng, count=4, shape=(12, 12))
    from_lists = pixel_metrics(masks, maps)
    from_png_style = pixel_metrics((np.stack(masks) * 255).astype(np.uint8),
                                   np.stack(maps).astype(np.float32))
    for name, value in from_lists.items():
        assert from_png_style[name] == pytest.approx(value, abs=1e-6), name


def test_pixel_metrics_shape_mismatch_names_the_image():
    masks = [np.zeros((8, 8), bool), np.zeros((8, 8), bool), np.zeros((8, 8), bool)]
    maps = [np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 7))]
    with pytest.raises(ValueError, match=r"mask 2 has shape \(8, 8\) but anomaly map 2 has shape \(8, 7\)"):
        pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match="mask 2"):
        aupro(masks, maps)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        ([], [], "no images"),
        ([np.zeros((4, 4), bool)], [np.zeros((4, 4)), np.zeros((4, 4))], "1 masks but 2"),
        ([np.zeros((4, 4), bool)], [np.full((4, 4), np.nan)], "anomaly map 0 contains NaN"),
        ([np.array([[0, 0.5], [1, 0]])], [np.zeros((2, 2))], "mask 0 is not binary"),
        ([np.zeros(4, bool)], [np.zeros(4)], "mask 0 must be 2-D"),
    ],
)
def test_pixel_metrics_bad_input_raises(masks, maps, message):
    with pytest.raises(ValueError, match=message):
        pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match=message):
        pixel_auroc(masks, maps)


def test_pixel_metrics_without_defects_or_without_normal_pixels_give_nan():
    no_defects = pixel_metrics([np.zeros((4, 4), bool)] * 2, [np.ones((4, 4)), np.zeros((4, 4))])
    all_defect = pixel_metrics([np.ones((4, 4), bool)], [np.arange(16.0).reshape(4, 4)])
    for result in (no_defects, all_defect):
        assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}
        assert all(math.isnan(v) for v in result.values())
    assert math.isnan(pixel_auroc([np.zeros((4, 4), bool)] * 2, [np.ones((4, 4)), np.zeros((4, 4))]))
    assert math.isnan(pixel_auroc([np.ones((4, 4), bool)], [np.arange(16.0).reshape(4, 4)]))
    assert math.isnan(aupro([np.zeros((3, 3), bool)], [np.ones((3, 3))]))
    with pytest.raises(ValueError, match="at least one defect region"):
        pro_curve([np.zeros((3, 3), bool)], [np.ones((3, 3))])


# ---------------------------------------------------------------------------------------------
# AUPRO: hand-computed cases
# ---------------------------------------------------------------------------------------------


def two_regions_of_different_sizes():
    """6x6 image: region A is 1 pixel at (0, 0); region B is the 3x3 block rows/cols 3..5."""
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True
    mask[3:6, 3:6] = True
    return mask


def test_aupro_perfect_map_is_one():
    mask = two_regions_of_different_sizes()
    assert aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert pixel_metrics([mask], [mask.astype(float)]) == pytest.approx(
        {"pixel_auroc": 1.0, "pixel_ap": 1.0, "pixel_f1max": 1.0, "aupro": 1.0})


def test_aupro_one_of_two_regions_found_other_below_all_normals():
    # Scores: region A (1 px) = 1, normal pixels = 0, region B (9 px) = -1.
    # t=1 : FPR 0, PRO = (1 + 0)/2 = 0.5;  t=0 : FPR 1, PRO 0.5;  t=-1: FPR 1, PRO 1.
    # Curve (0,0) (0,0.5) (1,0.5) (1,1): over FPR [0, 0.3] PRO is 0.5 -> area 0.15 -> AUPRO 0.5.
    # Every region weighs the same: the pixel recall at zero FPR would be only 1/10.
    mask = two_regions_of_different_sizes()
    scores = np.zeros((6, 6))
    scores[0, 0] = 1.0
    scores[3:6, 3:6] = -1.0
    assert aupro([mask], [scores]) == pytest.approx(0.5)
    # The same if the big region is the one found: PRO does not depend on region size.
    assert aupro([mask], [-scores * (mask.astype(float))]) == pytest.approx(0.5)


def test_aupro_one_region_found_other_tied_with_normals_interpolates_at_max_fpr():
    # Scores: region A = 1; region B and all normal pixels = 0 (tied).
    # t=1 : FPR 0, PRO 0.5;  t=0 admits B and every normal pixel at once: FPR 1, PRO 1.
    # Curve (0,0) (0,0.5) (1,1): PRO(x) = 0.5 + 0.5 x. PRO at x=0.3 is interpolated: 0.65.
    # Area = 0.3 * (0.5 + 0.65) / 2 = 0.1725 -> AUPRO = 0.1725 / 0.3 = 0.575.
    mask = two_regions_of_different_sizes()
    scores = np.zeros((6, 6))
    scores[0, 0] = 1.0
    assert aupro([mask], [scores]) == pytest.approx(0.575)
    # With max_fpr=1: area = (0.5 + 1) / 2 = 0.75.
    assert aupro([mask], [scores], max_fpr=1.0) == pytest.approx(0.75)


def staircase_case():
    """Three images, 10 normal pixels in all, two regions of different sizes, partial overlaps.

    image 0 (2x5, defect-free): normal scores 0.9 0.7 0.5 0.3 0.1 0.05 0.05 0.05 0.05 0.05
    image 1 (1x2, all defect) : region A (2 px), scores 0.8 0.4
    image 2 (2x2, all defect) : region B (4 px), scores 0.8 0.6 0.6 0.0
    """
    masks = [np.zeros((2, 5), bool), np.ones((1, 2), bool), np.ones((2, 2), bool)]
    maps = [np.array([[0.9, 0.7, 0.5, 0.3, 0.1], [0.05] * 5]),
            np.array([[0.8, 0.4]]),
            np.array([[0.8, 0.6], [0.6, 0.0]])]
    return masks, maps


def test_aupro_staircase_hand_computed():
    # threshold: FPR, overlap A, overlap B -> PRO
    #   0.9 : 0.1, 0,   0    -> 0
    #   0.8 : 0.1, 1/2, 1/4  -> 0.375
    #   0.7 : 0.2, 1/2, 1/4  -> 0.375
    #   0.6 : 0.2, 1/2, 3/4  -> 0.625
    #   0.5 : 0.3, 1/2, 3/4  -> 0.625
    #   0.4 : 0.3, 1,   3/4  -> 0.875
    # Area on [0, 0.3]: 0 on [0, 0.1], 0.375*0.1 on [0.1, 0.2], 0.625*0.1 on [0.2, 0.3] = 0.1;
    # the vertical step at exactly 0.3 adds nothing. AUPRO = 0.1 / 0.3 = 1/3.
    masks, maps = staircase_case()
    assert aupro(masks, maps) == pytest.approx(1 / 3)
    # Up to 0.25: 0.0375 + 0.625 * 0.05 = 0.06875 -> 0.06875 / 0.25 = 0.275.
    assert aupro(masks, maps, max_fpr=0.25) == pytest.approx(0.275)
    fpr, pro = pro_curve(masks, maps, max_fpr=0.3)
    np.testing.assert_allclose(fpr[:7], [0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    np.testing.assert_allclose(pro[:7], [0, 0, 0.375, 0.375, 0.625, 0.625, 0.875])
    assert fpr[-1] > 0.3  # the curve goes one point past the limit, for interpolation


def test_aupro_defect_free_images_only_add_to_fpr():
    # image 0 (4x4): defect = 2x2 block scored 1, its 12 normal pixels scored 0.
    # image 1 (2x2, defect-free): one pixel scored 2, three scored 0. Normal pixels in all: 16.
    # t=2: FPR 1/16, PRO 0;  t=1: FPR 1/16, PRO 1;  t=0: FPR 1, PRO 1.
    # AUPRO = (0.3 - 1/16) * 1 / 0.3 = 1 - 1/(16*0.3) = 19/24.
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    good_map = np.zeros((2, 2))
    good_map[0, 0] = 2.0
    value = aupro([mask, np.zeros((2, 2), bool)], [mask.astype(float), good_map])
    assert value == pytest.approx(19 / 24)
    assert aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)  # without the good image


def test_aupro_uses_8_connectivity():
    # An L of 3 pixels plus one pixel touching it only at a corner: one region of 4 pixels with
    # 8-connectivity (MVTec), two regions (3 px + 1 px) with 4-connectivity.
    # Only the corner pixel is detected (score 1), other defect pixels score below the normals:
    # 8-connectivity: PRO at FPR 0 = 1/4 -> AUPRO 0.25; 4-connectivity would give (0 + 1)/2 = 0.5.
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 0] = mask[1, 1] = True
    mask[2, 2] = True
    scores = np.where(mask, -1.0, 0.0)
    scores[2, 2] = 1.0
    assert aupro([mask], [scores]) == pytest.approx(0.25)


def test_aupro_is_not_fooled_by_a_constant_map():
    # Everything tied: the single threshold admits all pixels: curve (0,0) -> (1,1), AUPRO at 0.3
    # = area 0.045 / 0.3 = 0.15 (the diagonal, like chance level).
    mask = two_regions_of_different_sizes()
    assert aupro([mask], [np.full((6, 6), 0.5)]) == pytest.approx(0.15)


def test_aupro_rejects_bad_limit():
    mask = two_regions_of_different_sizes()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_fpr"):
            aupro([mask], [mask.astype(float)], max_fpr=bad)


# ---------------------------------------------------------------------------------------------
# AUPRO: against a brute-force implementation of the definition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 0.5, 1.0])
def test_aupro_matches_brute_force_reference(seed, max_fpr):
    rng = np.random.default_rng(seed)
    masks, maps = random_masks_and_maps(rng, count=6, shape=(16, 20), score_step=0.05)
    expected = brute_force_aupro(masks, maps, max_fpr)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < 1.0


def hand_built_masks_and_maps():
    """Three 8x8 images: two defects touching only at a corner plus a one-pixel defect; a one-pixel
    defect beside a 3x3 one; a defect-free image with a strong false positive. Maps: quantised
    noise (ties) plus a signal that finds some regions better than others."""
    rng = np.random.default_rng(11)
    masks = [np.zeros((8, 8), dtype=bool) for _ in range(3)]
    masks[0][1:3, 1:3] = True
    masks[0][3:5, 3:5] = True  # touches the block above only at the corner (2, 2)-(3, 3)
    masks[0][0, 7] = True      # one pixel
    masks[1][4, 4] = True      # one pixel
    masks[1][0:3, 5:8] = True
    maps = [np.round(rng.uniform(0.0, 0.6, (8, 8)), 1) for _ in range(3)]
    maps[0][1:3, 1:3] += 0.5   # one half of the corner-touching pair stands out, the other does not
    maps[0][0, 7] = 0.9
    maps[1][0:3, 5:8] += 0.2
    maps[2][2, 2] = 1.0        # a false positive above every defect pixel
    return masks, maps


@pytest.mark.parametrize("max_fpr", [0.3, 0.1])
def test_aupro_equals_the_mvtec_definition_on_hand_built_masks(max_fpr):
    masks, maps = hand_built_masks_and_maps()
    # 8-connectivity joins the corner-touching blocks: 2 regions in image 0 (3 with the cross), 2 in image 1.
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] == 2 and ndimage.label(masks[0])[1] == 3
    expected = brute_force_aupro(masks, maps, max_fpr)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)
    # The case tells the definitions apart: 4-connected regions, or no defect-free image, change it.
    assert abs(brute_force_aupro(masks, maps, max_fpr, structure=ndimage.generate_binary_structure(2, 1))
               - expected) > 1e-3
    assert abs(aupro(masks[:2], maps[:2], max_fpr=max_fpr) - expected) > 1e-4
    assert aupro(masks[:2], maps[:2], max_fpr=max_fpr) == pytest.approx(
        brute_force_aupro(masks[:2], maps[:2], max_fpr), abs=1e-12)


def test_pro_curve_full_range_ends_at_one_one_and_is_monotone():
    rng = np.random.default_rng(7)
    masks, maps = random_masks_and_maps(rng)
    fpr, pro = pro_curve(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


# ---------------------------------------------------------------------------------------------
# per-category normalisation
# ---------------------------------------------------------------------------------------------


def test_normalize_per_category_uses_one_min_and_max_for_all_maps():
    maps = [np.array([[2.0, 4.0]]), np.array([[6.0, 10.0]]), np.array([[3.0]])]
    normalised = normalize_per_category(maps)
    # category min 2, max 10: (x - 2) / 8
    np.testing.assert_allclose(normalised[0], [[0.0, 0.25]])
    np.testing.assert_allclose(normalised[1], [[0.5, 1.0]])
    np.testing.assert_allclose(normalised[2], [[0.125]])
    assert normalised[0].max() < 1.0  # not normalised per map
    np.testing.assert_array_equal(maps[0], [[2.0, 4.0]])  # inputs untouched


def test_normalize_per_category_dtypes_and_constant_category():
    float32 = normalize_per_category([np.array([[1, 3]], np.float32), np.array([[5]], np.float32)])
    assert all(m.dtype == np.float32 for m in float32)
    assert float32[1][0, 0] == 1.0 and float32[0][0, 0] == 0.0
    integers = normalize_per_category([np.array([[0, 255]], np.uint8)])
    assert integers[0].dtype == np.float64
    np.testing.assert_allclose(integers[0], [[0.0, 1.0]])
    constant = normalize_per_category([np.full((2, 2), 7.0), np.full((1, 3), 7.0)])
    assert [m.shape for m in constant] == [(2, 2), (1, 3)]
    assert all(np.all(m == 0.0) for m in constant)
    with pytest.raises(ValueError, match="no anomaly maps"):
        normalize_per_category([])
    with pytest.raises(ValueError, match="anomaly map 1 contains NaN"):
        normalize_per_category([np.zeros((2, 2)), np.array([[np.inf]])])


def test_normalize_per_category_leaves_rank_metrics_unchanged():
    rng = np.random.default_rng(10)
    masks, maps = random_masks_and_maps(rng, score_step=1e-3)
    maps = [m * 40.0 + 7.0 for m in maps]
    normalised = normalize_per_category(maps)
    assert min(m.min() for m in normalised) == 0.0 and max(m.max() for m in normalised) == 1.0
    before, after = pixel_metrics(masks, maps), pixel_metrics(masks, normalised)
    for name in before:
        assert after[name] == pytest.approx(before[name], abs=1e-9), name


# ---------------------------------------------------------------------------------------------
# aggregation over seeds
# ---------------------------------------------------------------------------------------------


def test_summarize_over_seeds_mean_and_sample_std():
    runs = [{"image_auroc": 0.8, "aupro": 0.5}, {"image_auroc": 0.9, "aupro": 0.5},
            {"image_auroc": 1.0, "aupro": 0.5}]
    summary = summarize_over_seeds(runs)
    assert list(summary) == ["image_auroc", "aupro"]
    # mean 0.9; squared deviations 0.01 + 0 + 0.01 = 0.02; sample std sqrt(0.02 / 2) = 0.1
    assert summary["image_auroc"]["mean"] == pytest.approx(0.9)
    assert summary["image_auroc"]["std"] == pytest.approx(0.1)
    assert summary["aupro"] == pytest.approx({"mean": 0.5, "std": 0.0})
    # population std: sqrt(0.02 / 3)
    population = summarize_over_seeds(runs, ddof=0)
    assert population["image_auroc"]["std"] == pytest.approx(math.sqrt(0.02 / 3))


def test_summarize_over_seeds_single_run_nan_and_errors():
    single = summarize_over_seeds([{"image_ap": 0.7}])
    assert single["image_ap"]["mean"] == 0.7 and math.isnan(single["image_ap"]["std"])
    assert summarize_over_seeds([{"image_ap": 0.7}], ddof=0)["image_ap"] == {"mean": 0.7, "std": 0.0}
    with_nan = summarize_over_seeds([{"aupro": 0.5}, {"aupro": float("nan")}])
    assert math.isnan(with_nan["aupro"]["mean"]) and math.isnan(with_nan["aupro"]["std"])
    with pytest.raises(ValueError, match="no runs"):
        summarize_over_seeds([])
    with pytest.raises(ValueError, match=r"run 1 .*missing: \['aupro'\]"):
        summarize_over_seeds([{"aupro": 0.5, "image_ap": 0.1}, {"image_ap": 0.2}])
    with pytest.raises(ValueError, match="not a number"):
        summarize_over_seeds([{"aupro": "0.5"}])


def test_summarize_over_seeds_of_real_metric_dicts():
    rng = np.random.default_rng(11)
    runs = []
    for _ in range(3):
        labels = rng.integers(0, 2, 50)
        labels[:2] = [0, 1]
        runs.append(image_metrics(labels, labels + rng.normal(0, 1, 50)))
    summary = summarize_over_seeds(runs)
    aurocs = [run["image_auroc"] for run in runs]
    assert summary["image_auroc"]["mean"] == pytest.approx(np.mean(aurocs))
    assert summary["image_auroc"]["std"] == pytest.approx(np.std(aurocs, ddof=1))
