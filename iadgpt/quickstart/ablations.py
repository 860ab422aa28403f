"""`iadgpt quickstart --ablations`: the paper's Tables 3 and 4 at quickstart scale, as one table.

Which parts of IADGPT matter, measured on the quickstart's own held-out categories at k = 2:

* trained variants (each retrains from the same random checkpoint on the same data, with the same
  total training minutes as the quickstart run, spread over its remaining stages):
  without stage 1, without stage 2, without multi-layer vision fusion (the last vision block
  only), with the attention map from the last LLM layer only, without the pixel loss, without
  the in-context residuals (`iadgpt.model.residuals`, beyond the paper), with the residuals
  given to the language model only (not added to the scores: setting `residuals.scores`),
  without the half-patch-shifted exemplars in the residuals' patch bank (`residuals.shifted_exemplars`),
  with the map's evidence on the patch grid instead of the half-patch lattice
  (`residuals.shifted_query`), and with the attention map added to the evidence in the map
  (`residuals.map_attention`), and with the vision encoder trained in stages 1 and 2 as well (the
  quickstart's `frozen_vision_stages`);
* the image score from the Yes/No answer alone (`residuals.image_score_map_weight` 0, the paper's score): the
  quickstart's model evaluated without fusing its score with the map's maximum (inference only);
* exemplar retention 100 / 40 / 20 / 10 / 5 %: the quickstart's model evaluated with that share of
  each non-reference exemplar's visual tokens kept (inference only; it was trained at 20 %).

Every row scores exactly the quickstart's k = 2 references and queries (its manifest, cut to k = 2).
Variants live in OUT/ablations/<name>/ (each a resumable quickstart run sharing OUT's data), the
table in OUT/ablations/ablations.md and .json. Each trained variant takes about the quickstart's own
wall time, each inference-only row well under a minute. `--variants a,b` trains some of them (split
the variants over processes), and a final `--ablations` reuses what is trained and writes the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

TRAINED_VARIANTS: dict[str, tuple[str, dict]] = {
    "no_stage1": ("without stage 1 (captions)", {"stages": (2, 3)}),
    "no_stage2": ("without stage 2 (discrepancy tasks)", {"stages": (1, 3)}),
    "no_fusion": ("without multi-layer vision fusion", {"iadgpt": {"vision_fusion_layers": []}}),
    "last_layer_map": ("attention map from the last LLM layer only", {"iadgpt": {"attention_map_layers": "last"}}),
    "no_pixel_loss": ("without the focal + Dice pixel loss", {"iadgpt": {"pixel_loss_weight": 0.0}}),
    "no_residuals": ("without the in-context residuals (and their evidence and shifted exemplars)",
                     {"iadgpt": {"residuals": {"tokens": False, "scores": False, "shifted_exemplars": False,
                                               "shifted_query": False}}}),
    "no_residual_scores": ("residuals for the language model only, not in the scores or the map",
                           {"iadgpt": {"residuals": {"scores": False, "shifted_query": False}}}),
    "no_exemplar_shifts": ("without the half-patch-shifted exemplars in the patch bank",
                           {"iadgpt": {"residuals": {"shifted_exemplars": False}}}),
    "no_query_shifts": ("the map's evidence on the patch grid, not the half-patch lattice",
                        {"iadgpt": {"residuals": {"shifted_query": False}}}),
    "attention_in_map": ("the attention map's logit added to the evidence in the map",
                         {"iadgpt": {"residuals": {"map_attention": True}}}),
    "trained_vision": ("the vision encoder trained in stages 1 and 2 too (not frozen)", {"frozen_vision_stages": ()}),
}
INFERENCE_VARIANTS: dict[str, tuple[str, dict]] = {
    "answer_only_score": ("image score from the Yes/No answer alone, not fused with the map's maximum "
                          "(inference only)", {"residuals": {"image_score_map_weight": 0.0}}),
}
"""The quickstart's model evaluated with an IADGPT setting changed (no training)."""
RETENTIONS = (1.0, 0.4, 0.2, 0.1, 0.05)
ABLATION_SHOTS = (2,)


def k_only_manifest(manifest: Path, out: Path, k: int) -> Path:
    """The quickstart's manifest with only the k-shot references: the same draws and queries."""
    document = json.loads(manifest.read_text())
    for entry in document["categories"].values():
        entry["references"] = {str(k): entry["references"][str(k)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2))
    return out


def variant_settings(base, changes: dict, text_layers: int):
    """The quickstart's settings with one thing changed (layer "last" resolved for this preset)."""
    from ..model.settings import merge_settings_dicts  # the model package loads torch: only when needed

    changes = json.loads(json.dumps(changes))
    iadgpt_changes = {key: [text_layers] if value == "last" else value
                      for key, value in changes.pop("iadgpt", {}).items()}
    iadgpt = merge_settings_dicts(base.iadgpt, iadgpt_changes)
    return dataclasses.replace(base, iadgpt=iadgpt, shots=ABLATION_SHOTS, **changes)


def check_variants(variants: list[str] | None) -> None:
    """Refuse names that are not trained variants (before any work is done)."""
    from .settings import QuickstartError

    unknown = sorted(set(variants or []) - set(TRAINED_VARIANTS))
    if unknown:
        raise QuickstartError(f"unknown ablation variants {unknown}; allowed: {sorted(TRAINED_VARIANTS)}")


def run_ablations(out: Path, settings, say=print, variants: list[str] | None = None) -> dict:
    """Train and evaluate every variant after the quickstart in `out`; write the table.

    `variants`: train only these (names of TRAINED_VARIANTS) and skip the inference-only rows, so several
    processes or machines can share the work; a final call without it reuses their finished runs
    (each variant resumes) and writes the whole table.
    """
    check_variants(variants)
    from ..evaluation.by_kind import metrics_by_kind
    from .pipeline import Quickstart
    from .settings import QuickstartPaths, RunState, prepare_output

    out = Path(out)
    main_state = json.loads((out / "state.json").read_text())
    if "report" not in main_state["phases"]:
        raise RuntimeError(f"{out} has no finished quickstart run: run `iadgpt quickstart --out {out}` first")
    folder = out / "ablations"
    manifest = k_only_manifest(out / "eval" / "model" / "manifest.json", folder / "manifest_k2.json", 2)
    main = Quickstart(settings, QuickstartPaths(out), RunState(out / "state.json", settings.document()))
    training_budget = sum(main_state["plan"]["training_seconds"].values())
    held_out = main.paths.held_out
    text_layers = main.preset.text_layers
    rows = []

    def metrics_of(benchmark: Path) -> dict:
        k = metrics_by_kind(benchmark, held_out, held_out / "images.jsonl", settings.image_size, shots=[2])["2"]
        return {name: summary["mean"] for name, summary in k.items()}

    main_minutes = training_budget / 60
    rows.append({"variant": "quickstart (all stages, fusion, 4-layer maps, pixel loss, residuals in the LLM "
                            "and the scores, score loss, retention 20%)",
                 "name": "full", "training_minutes": round(main_minutes, 2), **metrics_of(main.paths.model_eval)})
    for name, (title, changes) in TRAINED_VARIANTS.items():
        if variants is not None and name not in variants:
            continue
        started = time.monotonic()
        variant = variant_settings(settings, changes, text_layers)
        paths = QuickstartPaths(folder / name, data=out / "data", model=out / "model")
        prepare_output(paths.out, variant, overwrite=False)
        state = RunState(paths.state, variant.document())
        state.save()
        say(f"[ablations] {name}: {title}")
        Quickstart(variant, paths, state, say=say, shared_data=True, training_budget=training_budget,
                   manifest=manifest).run()
        rows.append({"variant": title, "name": name, "training_minutes": round(main_minutes, 2),
                     **metrics_of(paths.model_eval), "wall_minutes": round((time.monotonic() - started) / 60, 1)})
    for name, (title, changes) in INFERENCE_VARIANTS.items() if variants is None else ():
        benchmark = folder / name / "eval"
        say(f"[ablations] {name}: {title}")
        main.evaluate(benchmark, manifest, eval_iadgpt=changes, desc=name)
        rows.append({"variant": title, "name": name, "training_minutes": round(main_minutes, 2), **metrics_of(benchmark)})
    for retention in RETENTIONS if variants is None else ():
        name = f"retention_{round(retention * 100)}"
        if retention == main.model_settings().get("exemplar_retention"):
            rows.append({"variant": f"exemplar retention {retention:.0%} (the quickstart model)", "name": name,
                         "training_minutes": round(main_minutes, 2), **metrics_of(main.paths.model_eval)})
            continue
        benchmark = folder / name / "eval"
        say(f"[ablations] {name}: the quickstart model keeping {retention:.0%} of exemplar tokens")
        main.evaluate(benchmark, manifest, eval_iadgpt={"exemplar_retention": retention}, desc=name)
        rows.append({"variant": f"exemplar retention {retention:.0%} (inference only)", "name": name,
                     "training_minutes": round(main_minutes, 2), **metrics_of(benchmark)})
    document = {"k": 2, "rows": rows}
    if variants is not None:  # a share of the work: the whole table is written by the final call
        say(f"[ablations] done: {', '.join(variants)}; run --ablations without --variants for the table")
        return document
    (folder / "ablations.json").write_text(json.dumps(document, indent=2) + "\n")
    (folder / "ablations.md").write_text(ablation_table(rows))
    say(f"[ablations] wrote {folder / 'ablations.md'}")
    return document


def ablation_table(rows: list[dict]) -> str:
    def pct(value):
        return "n/a" if value is None or value != value else f"{100 * value:.1f}"

    lines = ["# Ablations (held-out categories, k = 2, AUROC %)", "",
             "| variant | in-context image | local image | local pixel | training min |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {pct(row['image_auroc_in_context'])} | {pct(row['image_auroc_local'])} | "
                     f"{pct(row['pixel_auroc'])} | {row['training_minutes']:.1f} |")
    return "\n".join(lines) + "\n"
