"""Evaluation of IADGPT: detection and localisation metrics (more benchmark tooling lives beside)."""

from .metrics import (
    DEFAULT_MAX_FPR,
    IMAGE_METRIC_NAMES,
    METRIC_NAMES,
    PIXEL_METRIC_NAMES,
    aupro,
    f1_max,
    image_metrics,
    normalize_per_category,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
    summarize_over_seeds,
)

__all__ = [
    "DEFAULT_MAX_FPR", "IMAGE_METRIC_NAMES", "METRIC_NAMES", "PIXEL_METRIC_NAMES", "aupro", "f1_max",
    "image_metrics", "normalize_per_category", "pixel_auroc", "pixel_metrics", "pro_curve", "summarize_over_seeds",
]
