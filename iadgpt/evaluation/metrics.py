"""Detection and localisation metrics for few-shot industrial anomaly detection.

What is computed, and why this way:

* Image level (`image_metrics`): AUROC, average precision (AP) and F1-max of the image anomaly
  scores against the image labels (1 = defective). All three come from scikit-learn so our numbers
  are the ones the field reports: AUROC from `roc_auc_score`; AP (scikit-learn's step-wise
  definition, identical to `average_precision_score`) and F1-max (the maximum F1 over all
  thresholds, as in MVTec's evaluation scripts) both from one `precision_recall_curve`.
* Pixel level (`pixel_metrics`): the same three metrics on all pixels of a set of images (usually
  one category) pooled together, exactly, on the flattened arrays (no threshold binning, no
  subsampling): AUROC as the Mann-Whitney statistic from one ranking of the pixels (`rank_auroc`,
  equal to `roc_auc_score`, which builds the whole ROC curve and takes 2-3 times as long on a
  benchmark category's million pixels), AP and F1-max via scikit-learn, plus AUPRO up to a false
  positive rate of 0.3 (`aupro`, the MVTec AD reference definition, documented in detail there).
  Cost for 200 maps of 256x256 (13 M pixels), measured when the AUROC still came from
  `roc_auc_score`: about 15 s and 1 GB peak with float32 maps (18 s, 1.5 GB with float64), almost
  all of it inside the two sorts (the AUROC's and the precision-recall curve's); it grows linearly
  with the pixel count, so evaluate at a fixed resolution (256 is the usual choice) rather than at
  full image resolution.
* `normalize_per_category`: the IADGPT supplement ("Inference") min-max normalises pixel maps
  with one minimum and one maximum per category, treating the category as one batch.
* `summarize_over_seeds`: mean and sample standard deviation of each metric over few-shot seeds.

Degenerate inputs (the rule is the same everywhere): a metric that needs both classes is
undefined when one class is absent, and is then returned as ``float("nan")`` rather than raising,
so a benchmark over many categories keeps going and the gap stays visible (NaN propagates into
every mean computed from it, including `summarize_over_seeds`). Concretely:

* `image_metrics`: labels all 0 or all 1 -> all three image metrics are NaN.
* `pixel_metrics`: no defective pixel, or no normal pixel, in the whole set -> all four pixel
  metrics are NaN (AUPRO needs at least one defect region and at least one normal pixel).

Malformed inputs raise ``ValueError`` with a message naming the offending item: empty inputs,
length mismatches, a mask and a map of different shapes (the image index is named), maps that are
not 2-D, non-finite scores (NaN/inf), labels that are not 0/1, masks that are not binary, and an
integration limit outside (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "DEFAULT_MAX_FPR",
    "IMAGE_METRIC_NAMES",
    "PIXEL_METRIC_NAMES",
    "METRIC_NAMES",
    "image_metrics",
    "pixel_metrics",
    "pixel_auroc",
    "rank_auroc",
    "aupro",
    "pro_curve",
    "f1_max",
    "normalize_per_category",
    "summarize_over_seeds",
]

DEFAULT_MAX_FPR = 0.3
"""FPR integration limit of AUPRO used by MVTec AD and by the papers we compare against."""

IMAGE_METRIC_NAMES = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRIC_NAMES = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
METRIC_NAMES = IMAGE_METRIC_NAMES + PIXEL_METRIC_NAMES

# MVTec's reference `compute_pro` labels ground-truth components with
# `scipy.ndimage.label(gt_map, np.ones((3, 3)))`: 8-connectivity, i.e. pixels touching only at a
# corner belong to the same defect region. (scipy's *default* structure would be the 4-connected
# cross, which splits such regions and changes AUPRO, so the structure is passed explicitly.)
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

def _as_binary_labels(values, name: str) -> np.ndarray:
    """Image labels as a 1-D bool array; only 0/1 (or False/True) are accepted."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of 0/1 image labels, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 or bool, got dtype {array.dtype}")
    not_binary = (array != 0) & (array != 1)
    if not_binary.any():
        index = int(np.flatnonzero(not_binary)[0])
        raise ValueError(f"{name} must contain only 0 (normal) and 1 (defective); "
                         f"{name}[{index}] = {array[index].item()!r}")
    return array == 1


def _as_finite_scores(values, name: str) -> np.ndarray:
    """Image scores as a 1-D float array; NaN/inf would silently corrupt rankings, so they raise."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of image scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    not_finite = ~np.isfinite(array)
    if not_finite.any():
        index = int(np.flatnonzero(not_finite)[0])
        raise ValueError(f"{name} must be finite; {name}[{index}] = {array[index].item()!r}")
    return array


def _as_float_map(anomaly_map, index: int) -> np.ndarray:
    """One anomaly map as a 2-D floating array (float32 stays float32 to halve pooled memory)."""
    array = np.asarray(anomaly_map)
    if array.ndim != 2:
        raise ValueError(f"anomaly map {index} must be 2-D (H, W), got shape {array.shape}; "
                         f"pass a list of (H, W) maps or one (N, H, W) array")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"anomaly map {index} must be numeric, got dtype {array.dtype}")
    if not np.issubdtype(array.dtype, np.floating) or array.dtype == np.float16:
        array = array.astype(np.float32 if array.dtype == np.float16 else np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"anomaly map {index} contains NaN or inf values")
    return array


def _as_bool_mask(mask, index: int) -> np.ndarray:
    """One ground-truth mask as a 2-D bool array: nonzero = defective.

    Masks read from MVTec/VisA PNGs hold 0/255, masks from code hold 0/1 or bool; all are fine.
    A mask holding more than one nonzero value (e.g. 0, 0.5, 1 after bilinear resizing) is
    rejected, because "nonzero = defect" would silently grow every region: threshold it first.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask {index} must be 2-D (H, W), got shape {array.shape}; "
                         f"pass a list of (H, W) masks or one (N, H, W) array")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"mask {index} must be bool or numeric, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"mask {index} contains NaN or inf values")
    defective = array != 0
    nonzero_values = array[defective]
    if nonzero_values.size and (nonzero_values != nonzero_values.flat[0]).any():
        raise ValueError(f"mask {index} is not binary: it holds several nonzero values "
                         f"(e.g. {nonzero_values.min().item()!r} and {nonzero_values.max().item()!r}); "
                         f"threshold it (for example `mask > 127`) before evaluating")
    return defective


def _validate_masks_and_maps(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Check a set of (mask, map) pairs and return them as lists of bool masks and float maps.

    Images may differ in size from one another (VisA images do); only each mask and its own map
    must agree.
    """
    mask_list = list(masks)
    map_list = list(maps)
    if len(mask_list) == 0:
        raise ValueError("no images given: masks and maps are empty")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} anomaly maps; "
                         f"they must pair up one to one")
    bool_masks, float_maps = [], []
    for index, (mask, anomaly_map) in enumerate(zip(mask_list, map_list)):
        bool_mask = _as_bool_mask(mask, index)
        float_map = _as_float_map(anomaly_map, index)
        if bool_mask.shape != float_map.shape:
            raise ValueError(f"mask {index} has shape {bool_mask.shape} but anomaly map {index} has "
                             f"shape {float_map.shape}; resize the map to the mask's resolution")
        bool_masks.append(bool_mask)
        float_maps.append(float_map)
    return bool_masks, float_maps


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    return max_fpr


# --------------------------------------------------------------------------------------------
# Threshold-free classification metrics
# --------------------------------------------------------------------------------------------

def _ap_and_f1_max_checked(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Average precision and F1-max from one scikit-learn precision-recall curve.

    For validated inputs that contain both classes. One curve instead of separate
    `average_precision_score` and `precision_recall_curve` calls saves a full sort of all pixels
    (about 6 s per 13 M pixels). AP is scikit-learn's own definition, evaluated the same way
    `average_precision_score` does: sum over points of (R_n - R_{n-1}) * P_n (step-wise, not a
    trapezoid); the tests check equality with `average_precision_score`.

    drop_intermediate=True only drops interior points of runs where the true-positive count is
    constant. There recall does not move, so those points add exactly 0 to AP; and precision falls
    along the run, so F1 peaks at its first point, which is kept. Both values are therefore exact,
    and the curve is much smaller for pixel data.
    """
    precision, recall, _ = precision_recall_curve(labels, scores, drop_intermediate=True)
    average_precision = float(-np.sum(np.diff(recall) * precision[:-1]))
    denominator = precision + recall
    f1 = np.divide(2.0 * precision * recall, denominator,
                   out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)
    return average_precision, float(f1.max())


def f1_max(labels, scores) -> float:
    """Maximum F1 over all thresholds (points of scikit-learn's precision-recall curve).

    F1 at a point with precision + recall = 0 counts as 0. Returns NaN when `labels` holds only
    one class (F1-max would be 0 or 1 by construction, which says nothing about the scores).
    """
    labels = _as_binary_labels(labels, "labels")
    scores = _as_finite_scores(scores, "scores")
    if labels.shape != scores.shape:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    if labels.all() or not labels.any():
        return float("nan")
    return _ap_and_f1_max_checked(labels, scores)[1]


def image_metrics(labels, scores) -> dict[str, float]:
    """Image-level detection metrics: ``{"image_auroc", "image_ap", "image_f1max"}``.

    Args:
        labels: one 0/1 (or bool) label per image, 1 = defective.
        scores: one finite anomaly score per image, higher = more anomalous.

    AUROC is `sklearn.metrics.roc_auc_score`; AP equals `sklearn.metrics.average_precision_score`
    (the step-wise sum, not a trapezoid) and F1-max is `f1_max`, both read off one scikit-learn
    precision-recall curve. If the labels hold only one class, all three are NaN: AUROC is
    undefined then, and AP / F1-max would be trivially 0 or 1.
    """
    labels = _as_binary_labels(labels, "labels")
    scores = _as_finite_scores(scores, "scores")
    if labels.shape != scores.shape:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    if labels.all() or not labels.any():
        return {name: float("nan") for name in IMAGE_METRIC_NAMES}
    average_precision, best_f1 = _ap_and_f1_max_checked(labels, scores)
    return {"image_auroc": float(roc_auc_score(labels, scores)), "image_ap": average_precision,
            "image_f1max": best_f1}


def pixel_metrics(masks, maps, *, max_fpr: float = DEFAULT_MAX_FPR) -> dict[str, float]:
    """Pixel-level localisation metrics of a set of images (usually one category).

    Args:
        masks: sequence (or (N, H, W) array) of ground-truth masks, bool or 0/1 or 0/255,
            nonzero = defective pixel. Defect-free images have all-zero masks.
        maps: sequence (or (N, H, W) array) of anomaly maps, each of the same shape as its mask.
            Normalise them first if you want the paper's protocol (`normalize_per_category`);
            that affine rescaling does not change any of these rank-based metrics.
        max_fpr: FPR integration limit of AUPRO.

    Returns ``{"pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}``. The first three pool every
    pixel of every image and are computed exactly with scikit-learn on the flattened arrays (no
    binning, no subsampling; for 200 maps of 256x256 about 15 s and a 1 GB peak with float32 maps,
    1.5 GB with float64 -- pass float32 maps to save memory).
    `aupro` is documented in `aupro`. All four are NaN if the set has no defective pixel or no
    normal pixel.
    """
    max_fpr = _check_max_fpr(max_fpr)
    bool_masks, float_maps = _validate_masks_and_maps(masks, maps)
    pixel_labels, pixel_scores = _pooled_pixels(bool_masks, float_maps)
    if pixel_labels.all() or not pixel_labels.any():
        return {name: float("nan") for name in PIXEL_METRIC_NAMES}
    average_precision, best_f1 = _ap_and_f1_max_checked(pixel_labels, pixel_scores)
    result = {"pixel_auroc": rank_auroc(pixel_labels, pixel_scores), "pixel_ap": average_precision,
              "pixel_f1max": best_f1}
    del pixel_labels, pixel_scores
    result["aupro"] = _aupro_validated(bool_masks, float_maps, max_fpr)
    return result


def pixel_auroc(masks, maps) -> float:
    """`pixel_metrics(masks, maps)["pixel_auroc"]` alone: the AP, F1-max and AUPRO it skips take
    most of `pixel_metrics`' time, which matters where many subsets are scored (by defect type)."""
    pixel_labels, pixel_scores = _pooled_pixels(*_validate_masks_and_maps(masks, maps))
    if pixel_labels.all() or not pixel_labels.any():
        return float("nan")
    return rank_auroc(pixel_labels, pixel_scores)


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of boolean `labels` (both classes present) as the Mann-Whitney U statistic: the chance
    that a random positive scores above a random negative, ties counting one half, from the
    positives' ranks among all scores (ties get their average rank). Equal to `roc_auc_score`, in
    one sort instead of a whole ROC curve."""
    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _pooled_pixels(bool_masks: list[np.ndarray], float_maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of every image: labels (defective or not) and anomaly scores, flattened."""
    return (np.concatenate([mask.ravel() for mask in bool_masks]),
            np.concatenate([anomaly_map.ravel() for anomaly_map in float_maps]))


# --------------------------------------------------------------------------------------------
# AUPRO (per-region overlap), MVTec AD reference definition
# --------------------------------------------------------------------------------------------

def _label_defect_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions of one bool mask, 8-connectivity (MVTec reference)."""
    labels, region_count = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
    return labels, int(region_count)


def _pro_curve_validated(bool_masks: list[np.ndarray], float_maps: list[np.ndarray],
                         max_fpr: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) points for validated inputs, or None if the curve is undefined.

    Returns the exact curve for every distinct threshold t down to the first one whose FPR
    exceeds `max_fpr` (enough to integrate up to `max_fpr`), prefixed with (0, 0).
    """
    normal_score_parts, defect_score_parts, defect_weight_parts = [], [], []
    region_count = 0
    for mask, anomaly_map in zip(bool_masks, float_maps):
        normal_score_parts.append(anomaly_map[~mask])
        if not mask.any():
            continue
        region_labels, regions_here = _label_defect_regions(mask)
        region_sizes = np.bincount(region_labels.ravel())
        labels_of_defect_pixels = region_labels[mask]
        defect_score_parts.append(anomaly_map[mask])
        # A defect pixel contributes 1/|its region| to the summed overlap of all regions once it is
        # above the threshold; dividing the sum by the number of regions gives the PRO.
        defect_weight_parts.append(1.0 / region_sizes[labels_of_defect_pixels])
        region_count += regions_here

    normal_scores = np.concatenate(normal_score_parts)
    normal_count = normal_scores.size
    if region_count == 0 or normal_count == 0:
        return None
    defect_scores = np.concatenate(defect_score_parts)
    defect_weights = np.concatenate(defect_weight_parts)

    # Only thresholds down to the first one with FPR > max_fpr matter. That threshold is the
    # m-th largest normal score with m = floor(max_fpr * N) + 1; keeping every pixel scoring at
    # least that much gives the exact curve over that range while sorting ~max_fpr of the pixels.
    # (+2 instead of +1 guards against rounding in max_fpr * N; extra points are harmless.)
    needed_normals = math.floor(max_fpr * normal_count) + 2
    if needed_normals < normal_count:
        cutoff = np.partition(normal_scores, normal_count - needed_normals)[normal_count - needed_normals]
        normal_scores = normal_scores[normal_scores >= cutoff]
        keep_defects = defect_scores >= cutoff
        defect_scores, defect_weights = defect_scores[keep_defects], defect_weights[keep_defects]

    scores = np.concatenate([normal_scores, defect_scores])
    is_normal = np.concatenate([np.ones(normal_scores.size, dtype=bool),
                                np.zeros(defect_scores.size, dtype=bool)])
    weights = np.concatenate([np.zeros(normal_scores.size), defect_weights])
    del normal_scores, defect_scores, defect_weights

    order = np.argsort(scores, kind="stable")[::-1]  # descending score = ascending FPR
    sorted_scores = scores[order]
    false_positives = np.cumsum(is_normal[order], dtype=np.int64)
    overlap_sums = np.cumsum(weights[order])
    del order, scores, is_normal, weights
    # A threshold admits all pixels with score >= t at once: keep the last point of each run of
    # tied scores, which includes every pixel of the tie.
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = false_positives[last_of_tie] / normal_count
    pro = np.minimum(overlap_sums[last_of_tie] / region_count, 1.0)  # clip cumsum rounding
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _integrate_up_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under (fpr, pro) from 0 to max_fpr, divided by max_fpr.

    Points sharing an FPR are vertical steps (zero width). If no point lies exactly at max_fpr,
    PRO there is linearly interpolated between its neighbours, as in MVTec's `trapezoid(x_max=)`.
    """
    inside = int(np.count_nonzero(fpr <= max_fpr))  # fpr is non-decreasing, so a prefix
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    if x[-1] < max_fpr:  # the curve always goes on past max_fpr, so fpr[inside] exists
        x0, y0, x1, y1 = fpr[inside - 1], pro[inside - 1], fpr[inside], pro[inside]
        y_at_limit = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (max_fpr - x0) * (y0 + y_at_limit) / 2.0
    return area / max_fpr


def _aupro_validated(bool_masks, float_maps, max_fpr: float) -> float:
    curve = _pro_curve_validated(bool_masks, float_maps, max_fpr)
    if curve is None:
        return float("nan")
    return float(_integrate_up_to(*curve, max_fpr))


def pro_curve(masks, maps, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve as arrays ``(fpr, pro)``, for plotting (definition: `aupro`).

    The curve starts at (0, 0) and has one point per distinct score threshold, in increasing
    FPR, down to the first threshold whose FPR exceeds `max_fpr` (with ``max_fpr=1`` the whole
    curve, ending at (1, 1)); a tight `max_fpr` keeps it short. Raises ValueError if the set has
    no defect region or no normal pixel (the curve is undefined).
    """
    max_fpr = _check_max_fpr(max_fpr)
    bool_masks, float_maps = _validate_masks_and_maps(masks, maps)
    curve = _pro_curve_validated(bool_masks, float_maps, max_fpr)
    if curve is None:
        raise ValueError("the PRO curve needs at least one defect region and one normal pixel")
    return curve


def aupro(masks, maps, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Normalised area under the per-region-overlap curve up to FPR `max_fpr` (MVTec AD).

    This is the definition of MVTec AD's reference evaluation code (Bergmann et al., IJCV 2021,
    `compute_pro` + `trapezoid`), computed exactly:

    1. Defect regions are the connected components of each ground-truth mask with
       **8-connectivity** (structure ``np.ones((3, 3))``, as MVTec passes to
       ``scipy.ndimage.label``; not scipy's default 4-connected cross). Regions are counted over
       the whole set; R is their total number.
    2. For every distinct score value t in the set (no threshold sampling or binning), a pixel is
       predicted defective iff score >= t, and
       - PRO(t) = (1/R) * sum over regions r of |{p in r : score(p) >= t}| / |r|, i.e. every region
         weighs the same whatever its size or image (not per-image averages, not pixel recall);
       - FPR(t) = |{normal p : score(p) >= t}| / (number of normal pixels), over all normal
         pixels of all images, including the defect-free pixels of defective images.
       Images without any defect region contribute only to FPR.
    3. The points (FPR(t), PRO(t)) in increasing FPR, preceded by (0, 0), are integrated with
       the trapezoid rule from FPR 0 to `max_fpr`; PRO at exactly `max_fpr` is linearly
       interpolated between the neighbouring points when no point lies there. Pixels with tied
       scores enter together, so ties between normal and defect pixels give a sloped segment.
    4. The area is divided by `max_fpr` (a perfect map scores 1). The FPR axis is *not* rescaled
       in any other way (unlike some re-implementations that min-max the FPRs of the truncated
       curve), so a map that finds nothing scores 0.

    Args:
        masks: sequence (or (N, H, W) array) of ground-truth masks, nonzero = defective.
        maps: sequence (or (N, H, W) array) of anomaly maps, same shape as their masks.
        max_fpr: integration limit in (0, 1]; 0.3 by convention.

    Returns NaN if the set has no defect region or no normal pixel. Only pixels scoring at
    least the score at FPR ~ `max_fpr` are sorted, so memory stays near the size of the input.
    """
    max_fpr = _check_max_fpr(max_fpr)
    bool_masks, float_maps = _validate_masks_and_maps(masks, maps)
    return _aupro_validated(bool_masks, float_maps, max_fpr)


# --------------------------------------------------------------------------------------------
# Per-category normalisation and aggregation over seeds
# --------------------------------------------------------------------------------------------

def normalize_per_category(maps) -> list[np.ndarray]:
    """Min-max normalise all anomaly maps of one category jointly to [0, 1].

    The IADGPT supplement ("Inference") treats a category as one large batch: one minimum and one
    maximum over every pixel of every map of the category, then (map - min) / (max - min) for each
    map (Formula 5). Joint rather than per-map, because per-map normalisation would stretch every
    defect-free map to reach 1 and destroy the comparison between images. Being one increasing
    affine map per category, it leaves every rank metric of that category unchanged; it matters
    for thresholds, overlays and cross-category pooling.

    Returns a new list of float arrays (float32/float64 inputs keep their dtype, others become
    float64). If all values of the category are equal, every map becomes all zeros (no pixel is
    more anomalous than another). Raises ValueError for an empty input or non-finite values.
    """
    arrays = [np.asarray(anomaly_map) for anomaly_map in maps]
    if not arrays:
        raise ValueError("no anomaly maps given to normalise")
    for index, array in enumerate(arrays):
        if array.size == 0:
            raise ValueError(f"anomaly map {index} is empty")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"anomaly map {index} must be numeric, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"anomaly map {index} contains NaN or inf values")
    category_min = min(float(array.min()) for array in arrays)
    category_max = max(float(array.max()) for array in arrays)
    value_range = category_max - category_min
    normalised = []
    for array in arrays:
        out_dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.float64
        if value_range == 0.0:
            normalised.append(np.zeros(array.shape, dtype=out_dtype))
        else:
            scaled = (array.astype(np.float64) - category_min) / value_range
            normalised.append(scaled.astype(out_dtype, copy=False))
    return normalised


def summarize_over_seeds(runs: Sequence[Mapping[str, float]], *, ddof: int = 1
                         ) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over runs (one metric dict per seed).

    Returns ``{name: {"mean": m, "std": s}}`` in the key order of the first run.

    The std is the **sample** standard deviation (``ddof=1``, divisor n - 1) by default: the
    seeds are a small sample (typically 3) of all possible few-shot draws, and the population
    formula would understate the spread by sqrt((n-1)/n) (18 % for 3 seeds). With a single run the
    sample std is undefined and reported as NaN; pass ``ddof=0`` for the population std (0 for
    one run). NaN metric values propagate (mean and std become NaN) instead of being skipped, so
    a run with an undefined metric is not silently averaged away.

    Raises ValueError for no runs, runs with different metric names, or non-numeric values.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("no runs to summarise")
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    names = list(runs[0].keys())
    for index, run in enumerate(runs[1:], start=1):
        if set(run.keys()) != set(names):
            missing = sorted(set(names) - set(run.keys()))
            extra = sorted(set(run.keys()) - set(names))
            raise ValueError(f"run {index} does not have the same metrics as run 0 "
                             f"(missing: {missing}, extra: {extra})")
    summary = {}
    for name in names:
        values = []
        for index, run in enumerate(runs):
            value = run[name]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"metric {name!r} of run {index} is not a number: {value!r}")
            values.append(float(value))
        array = np.asarray(values, dtype=np.float64)
        mean = float(array.mean())
        std = float(array.std(ddof=ddof)) if array.size > ddof else float("nan")
        summary[name] = {"mean": mean, "std": std}
    return summary
