"""What the detection benchmark writes: results as JSON, CSV and Markdown, overlays and curves.

JSON is strict (`NaN` becomes `null`, since `NaN` is not JSON and breaks other readers) and written
atomically (a temporary file renamed into place), so an interrupted run never leaves a half file.
The Markdown table follows the paper's per-category tables: one row per category plus the mean,
image and pixel AUROC per k, in percent, as mean +- std over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import roc_curve

from ..data.samples import load_image
from .metrics import DEFAULT_MAX_FPR, METRIC_NAMES, pro_curve
from .plots import line_chart

__all__ = ["markdown_tables", "write_csv", "write_curves", "write_json", "write_overlays", "write_text"]

METRIC_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "aupro": "AUPRO",
}
MEAN_ROW = "mean"


def json_ready(value, digits: int | None = None):
    """`value` with every non-finite float replaced by None (JSON null: an undefined metric), and with
    `digits` every float rounded to that many decimals."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return float(value) if digits is None else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_text(path: Path, text: str) -> Path:
    """Write through a temporary file renamed into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_json(path: Path, document) -> Path:
    return write_text(path, json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n")


def _rows(results: dict):
    """(k, row name, M) for every category and the mean, in k order."""
    for k, entry in results["k"].items():
        for name, summary in entry["categories"].items():
            yield k, name, summary
        yield k, MEAN_ROW, entry["mean"]


def write_csv(path: Path, results: dict) -> Path:
    """One row per (k, category) plus a "mean" row per k; `<metric>_mean` and `<metric>_std` columns,
    empty where a metric is undefined."""
    stream = io.StringIO(newline="")
    writer = csv.writer(stream)
    writer.writerow(["k", "category"] + [f"{m}_{stat}" for m in METRIC_NAMES for stat in ("mean", "std")])
    for k, name, summary in _rows(results):
        values = [summary[m][stat] for m in METRIC_NAMES for stat in ("mean", "std")]
        writer.writerow([k, name] + ["" if not math.isfinite(v) else f"{v:.6f}" for v in values])
    return write_text(path, stream.getvalue())


def _percent(cell: dict) -> str:
    mean, std = cell["mean"], cell["std"]
    if not math.isfinite(mean):
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if math.isfinite(std) else "")


def markdown_tables(results: dict, title: str) -> str:
    """Per-category image/pixel AUROC per k (the paper's layout) and every metric of the mean."""
    shots = list(results["k"])
    categories = list(next(iter(results["k"].values()))["categories"])
    header = ["Category"] + [f"{k}-shot {METRIC_TITLES[m]}" for k in shots for m in ("image_auroc", "pixel_auroc")]
    lines = [f"# Detection benchmark: {title}", "",
             "Mean ± std over seeds, in %. Pixel maps normalised per category; "
             f"AUPRO up to FPR {DEFAULT_MAX_FPR} (MVTec AD definition).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name in categories + [MEAN_ROW]:
        cells = []
        for k in shots:
            summary = results["k"][k]["mean"] if name == MEAN_ROW else results["k"][k]["categories"][name]
            cells += [_percent(summary["image_auroc"]), _percent(summary["pixel_auroc"])]
        label = "**Mean**" if name == MEAN_ROW else name
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines += ["", "## Mean over categories, every metric", "",
              "| k | " + " | ".join(METRIC_TITLES[m] for m in METRIC_NAMES) + " |",
              "|---:|" + "---:|" * len(METRIC_NAMES)]
    for k in shots:
        lines.append(f"| {k} | " + " | ".join(_percent(results["k"][k]["mean"][m]) for m in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"


def _overlay_choice(evaluation, count: int) -> list[int]:
    """Indices of up to `count` queries, anomalous ones first (half), then normal ones."""
    anomalous = [i for i, label in enumerate(evaluation.labels) if label]
    normal = [i for i, label in enumerate(evaluation.labels) if not label]
    first = anomalous[: (count + 1) // 2]
    rest = normal[: count - len(first)]
    return first + rest + anomalous[len(first): count - len(rest)]  # too few normals: more anomalies


def write_overlays(folder: Path, evaluation, tag: str, count: int, key: Callable[[Path], str]) -> list[Path]:
    """Panels "image | heatmap overlay | ground truth" for a few queries of one category and run.

    The map drawn is the category-normalised one (what the pixel metrics rank), at the query's
    resolution; the caption gives the image score.
    """
    from ..inspection import heatmap_overlay

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in _overlay_choice(evaluation, count):
        sample = evaluation.queries[index]
        image = load_image(sample.image_path)
        mask = Image.fromarray(evaluation.masks[index].astype(np.uint8) * 255)
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
        panel = Image.new("RGB", (3 * image.width, image.height + 16), "white")
        panel.paste(image, (0, 16))
        panel.paste(heatmap_overlay(image, evaluation.maps[index]), (image.width, 16))
        panel.paste(mask.convert("RGB"), (2 * image.width, 16))
        ImageDraw.Draw(panel).text((2, 2), f"{sample.defect_type} score {evaluation.scores[index]:.3f}", fill="black")
        name = key(sample.image_path).replace("/", "_").rsplit(".", 1)[0]
        path = folder / f"{tag}_{name}.png"
        panel.save(path)
        written.append(path)
    return written


def write_curves(folder: Path, k: int, seed: int, evaluations: dict) -> list[Path]:
    """Image ROC and pixel PRO curves of every category in one run, one chart each."""
    roc, pro = [], []
    for name, evaluation in evaluations.items():
        if 0 < evaluation.labels.sum() < evaluation.labels.size:
            fpr, tpr, _ = roc_curve(evaluation.labels, evaluation.scores)
            roc.append((f"{name} {100 * evaluation.metrics['image_auroc']:.1f}", fpr, tpr))
        if math.isfinite(evaluation.metrics["aupro"]):
            fpr, overlap = pro_curve(evaluation.masks, evaluation.maps, max_fpr=DEFAULT_MAX_FPR)
            pro.append((f"{name} {100 * evaluation.metrics['aupro']:.1f}", fpr, overlap))
    folder = Path(folder)
    return [
        line_chart(folder / f"roc_k{k}.png", roc, title=f"Image ROC, {k}-shot, seed {seed} (legend: AUROC %)",
                   x_label="false positive rate", y_label="true positive rate", diagonal=True),
        line_chart(folder / f"pro_k{k}.png", pro, title=f"Pixel PRO, {k}-shot, seed {seed} (legend: AUPRO %)",
                   x_label="false positive rate", y_label="per-region overlap", x_max=DEFAULT_MAX_FPR),
    ]
