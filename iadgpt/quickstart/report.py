"""OUT/report.json and report.md: the benchmark by defect kind, the model paired with the baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..evaluation.reports import json_ready

if TYPE_CHECKING:
    from .pipeline import Quickstart

# --------------------------------------------------------------------------------------------------
# Reports


def report_document(metrics: dict, minutes: float, by_defect: dict | None = None, paired: dict | None = None) -> dict:
    """report.json: {"k": {"<k>": {"model": {...}, "baseline": {...}}}, "minutes": m} (means over seeds),
    with `by_defect`, the local defects by type:
    {"by_defect": {"<k>": {"model" | "baseline": {"<type>": {"image_auroc": x, "pixel_auroc": y}}}}},
    and with `paired` (`Quickstart.paired_with_baseline`), the model minus the baseline per draw and
    category: {"paired": {"<k>": {metric: {"mean", "sem", "n", "ahead", "behind", "differences"}}}}
    (the differences themselves kept, so several runs' can be pooled; research/paired_comparison.py
    recomputes them from the benchmarks, which ablation variants have too)."""
    document = {"k": {}}
    for k in metrics["model"]:
        document["k"][k] = {method: {name: json_ready(summary["mean"], 4) for name, summary in metrics[method][k].items()}
                            for method in ("model", "baseline")}
    document["minutes"] = round(minutes, 2)
    if by_defect is not None:
        document["by_defect"] = {
            k: {method: {defect: {name: json_ready(summary["mean"], 4) for name, summary in values.items()}
                         for defect, values in by_defect[method][k].items()}
                for method in ("model", "baseline")}
            for k in by_defect["model"]}
    if paired is not None:
        from ..evaluation.by_kind import summarize_differences

        document["paired"] = {
            k: {name: {**json_ready(summarize_differences(values), 4),
                       "differences": [round(float(v), 5) for v in values]}
                for name, values in by_metric.items()}
            for k, by_metric in paired.items()}
    return document



def _pct(summary: dict) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std == std and std > 0 else "")


def results_table(metrics: dict) -> str:
    """The report's main table: per k, model and baseline, the three metrics (percent, ± std over seeds)."""
    lines = ["| k | model: in-context image AUROC | model: local image AUROC | model: local pixel AUROC "
             "| baseline: in-context | baseline: local image | baseline: local pixel |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in metrics["model"]:
        cells = [_pct(metrics[method][k][name]) for method in ("model", "baseline")
                 for name in ("image_auroc_in_context", "image_auroc_local", "pixel_auroc")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_NAMES = {"image_auroc_in_context": "in-context image AUROC", "image_auroc_local": "local image AUROC",
                "pixel_auroc": "local pixel AUROC"}


def paired_difference(summary: dict) -> str:
    """"+0.32 ± 0.14" (AUROC points) from `summarize_differences(...)` or its report.json form, where
    an undefined value (NaN) is null; "n/a" without pairs."""
    mean, sem = summary["mean"], summary["sem"]
    if mean is None or mean != mean:
        return "n/a"
    return f"{100 * mean:+.2f}" + ("" if sem is None or sem != sem else f" ± {100 * sem:.2f}")


def paired_table(by_metric: dict) -> str:
    """Model minus baseline per metric: mean ± standard error (points), pairs ahead / behind / all
    (`by_metric`: {metric: `summarize_differences(...)`})."""
    lines = ["| metric | model - baseline (points) | ahead / behind / pairs |", "|---|---:|---:|"]
    for name, summary in by_metric.items():
        lines.append(f"| {PAIRED_NAMES.get(name, name)} | {paired_difference(summary)} | "
                     f"{summary['ahead']} / {summary['behind']} / {summary['n']} |")
    return "\n".join(lines)


def pooled_paired_table(runs: list[tuple[str, dict[str, list[float]]]]) -> tuple[str, dict]:
    """Model minus baseline per run and pooled over the runs' pairs: a markdown table (mean ±
    standard error in points, pairs ahead / behind / all) and the pooled summaries.

    `runs`: (run name, {metric: [model - baseline per pair]}) (`paired_differences` at one k); a run
    given twice counts twice."""
    from ..evaluation.by_kind import KIND_METRICS, summarize_differences

    def cell(summary: dict) -> str:
        if not summary["n"]:
            return "n/a"
        return f"{paired_difference(summary)} ({summary['ahead']} / {summary['behind']} / {summary['n']})"

    pooled = {name: [v for _, differences in runs for v in differences.get(name, [])] for name in KIND_METRICS}
    summaries = {name: summarize_differences(values) for name, values in pooled.items()}
    lines = ["| metric | " + " | ".join(run for run, _ in runs) + " | pooled |", "|---|" + "---:|" * (len(runs) + 1)]
    for name in KIND_METRICS:
        cells = [cell(summarize_differences(differences.get(name, []))) for _, differences in runs]
        lines.append(f"| {PAIRED_NAMES[name]} | " + " | ".join(cells + [cell(summaries[name])]) + " |")
    return "\n".join(lines), summaries


def defect_table(by_defect: dict, k: str) -> str:
    """Local defects by type at one k: image and pixel AUROC of the model beside the baseline's."""
    lines = ["| defect | model: image AUROC | baseline: image | model: pixel AUROC | baseline: pixel |",
             "|---|---:|---:|---:|---:|"]
    for defect in by_defect["model"][k]:
        cells = [_pct(by_defect[method][k][defect][name]) for name in ("image_auroc", "pixel_auroc")
                 for method in ("model", "baseline")]
        lines.append(f"| {defect} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(run: Quickstart, metrics: dict, document: dict, chat: list[tuple[str, str]],
                    by_defect: dict | None = None) -> str:
    s = run.settings
    phases = run.state.document["phases"]
    lines = [
        "# IADGPT quickstart report", "",
        f"A random-weight Qwen2.5-VL (`{s.preset}` preset) trained in three stages on {s.train_categories} synthetic "
        f"product categories, evaluated on {s.held_out_categories} held-out categories it never saw, "
        f"{s.seeds} few-shot draws per k. AUROC in percent (mean ± std over draws); local defects and "
        "in-context-only defects are each scored against the same normal images; pixel AUROC is over the "
        "local-defect and normal images.", "",
        results_table(metrics), "",
        f"Wall time: {document['minutes']:.1f} minutes (budget {s.minutes:g}).",
    ]
    for k, by_metric in document.get("paired", {}).items():
        lines += ["", f"## Model minus baseline, paired (k = {k})", "",
                  "The same references and queries scored by both; the difference per few-shot draw and "
                  "category (`iadgpt.evaluation.by_kind.paired_differences`), in AUROC points. Pool "
                  "several runs with `python research/paired_comparison.py RUN [RUN ...]`.", "",
                  paired_table(by_metric)]
    for k in (by_defect or {}).get("model", {}):
        lines += ["", f"## Local defects by type (k = {k})", "",
                  "Each type's images against the same normal images (`iadgpt.evaluation.by_kind.metrics_by_defect`).",
                  "", defect_table(by_defect, k)]
    lines += ["", "## Phases", "", "| phase | seconds | details |", "|---|---:|---|"]
    for name, info in phases.items():
        details = ", ".join(f"{k}={v}" for k, v in info.items() if k != "seconds")
        lines.append(f"| {name} | {info['seconds']:.0f} | {details} |")
    lines += ["", "Heatmap overlays (image | map | ground truth): `eval/model/overlays/`; the baseline's: "
              "`eval/baseline/overlays/`; full benchmark tables: `eval/*/results.md`.", "",
              "## Example chat", ""]
    lines += [f"**{who}**: {text}" + "  " for who, text in chat]
    return "\n".join(lines) + "\n"
