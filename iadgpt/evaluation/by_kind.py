"""Metrics by defect kind, read from a finished detection benchmark (its manifest and score cache).

Why: the synthetic factory has two kinds of defect that test different abilities. Local defects
(scratches, holes, ...) are visible in the query alone and have masks; in-context-only defects
(a wrong colour, count or pattern) look perfectly normal on their own and are defects only
against the category's normal exemplars. One AUROC over both hides which ability a model has, so
this module scores each kind against the same normal images:

* `image_auroc_local`: local-defect images vs normal images;
* `image_auroc_in_context`: in-context-only images vs normal images;
* `pixel_auroc`: every pixel of the local-defect and normal images (in-context masks cover whole
  products, which is not localisation).

`metrics_by_defect` breaks the local kind down further, by defect type (scratch, hole, ...): each
type's images against the same normal images, image and pixel AUROC, so a report shows which
defects a model localises worse than another method, not only that it does.

`paired_differences` compares two methods that scored the same manifest (the model and the
baseline): each metric's difference per few-shot draw and category, which `summarize_differences`
turns into a mean ± standard error (research/paired_comparison.py pools several runs).
`compare_benchmarks` gives all three for two such benchmarks in one pass over their maps.

Each metric is computed per category and averaged over categories (the benchmark's convention),
then averaged over the few-shot seeds. Nothing is re-scored: the scores and token maps come from
the benchmark's cache, the references and queries from its manifest, the masks through the same
`load_ground_truth` and `upsample_token_map` the benchmark itself uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .detection import DetectionSettings, ScoreCache, load_ground_truth, plan_benchmark, upsample_token_map
from .metrics import image_metrics, normalize_per_category, pixel_auroc, summarize_over_seeds

KIND_METRICS = ("image_auroc_local", "image_auroc_in_context", "pixel_auroc")
"""The three numbers reported per k and method."""


def defect_classes(images_jsonl: str | Path, field: str = "defect_class") -> dict[str, str]:
    """Image path (relative to the dataset root) -> "normal", "local" or "in_context" (factory images.jsonl).

    `field="defect"` gives each image's defect type instead ("good", "scratch", ...)."""
    classes = {}
    with Path(images_jsonl).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                item = json.loads(line)
                classes[item["image"]] = item[field]
    return classes


def _mean_over_categories(values: list[float]) -> float:
    # NaN (a category where the metric is undefined) propagates, as everywhere in metrics.py.
    return float(np.mean(values)) if values else float("nan")


def run_metrics_by_kind(queries, records: dict[str, dict], key, classes: dict[str, str], truth) -> dict[str, float]:
    """The three metrics of one category in one (k, seed) run."""
    by_class = _queries_by_class(queries, key, classes)
    return _kind_metrics(by_class, records, key, _local_masks_and_maps(by_class, records, key, truth))


def run_metrics_by_kind_and_defect(queries, records: dict[str, dict], key, classes: dict[str, str],
                                   defects: dict[str, str], truth) -> tuple[dict[str, float], dict[str, float]]:
    """(`run_metrics_by_kind`, `run_metrics_by_defect`) of one category in one (k, seed) run, with the
    maps upsampled and normalised once for both (most of their cost)."""
    by_class = _queries_by_class(queries, key, classes)
    masks_and_maps = _local_masks_and_maps(by_class, records, key, truth)
    return (_kind_metrics(by_class, records, key, masks_and_maps),
            _defect_metrics(by_class, records, key, defects, masks_and_maps))


def _kind_metrics(by_class: dict[str, list], records: dict[str, dict], key, masks_and_maps) -> dict[str, float]:
    result = {}
    for name, kind in (("image_auroc_local", "local"), ("image_auroc_in_context", "in_context")):
        chosen = by_class["normal"] + by_class[kind]
        if not by_class[kind]:
            continue  # the category has no defect of this kind: the metric does not apply to it
        labels = [0] * len(by_class["normal"]) + [1] * len(by_class[kind])
        scores = [records[key(s.image_path)]["score"] for s in chosen]
        result[name] = image_metrics(labels, scores)["image_auroc"]
    if masks_and_maps is not None:
        result["pixel_auroc"] = pixel_auroc(*masks_and_maps)
    return result


def _local_masks_and_maps(by_class: dict[str, list], records: dict[str, dict], key, truth) -> tuple[list, list] | None:
    """`_masks_and_maps` of the normal and local-defect queries (in that order), normalised together
    as `pixel_auroc` needs them; None without local defects."""
    if not by_class["local"]:
        return None
    return _masks_and_maps(by_class["normal"] + by_class["local"], records, key, truth)


def _queries_by_class(queries, key, classes: dict[str, str]) -> dict[str, list]:
    """The queries split into "normal", "local" and "in_context", each in the queries' order."""
    by_class: dict[str, list] = {"normal": [], "local": [], "in_context": []}
    for sample in queries:
        by_class[classes[key(sample.image_path)]].append(sample)
    return by_class


def _masks_and_maps(samples, records: dict[str, dict], key, truth) -> tuple[list, list]:
    """Ground-truth masks and the category-normalised anomaly maps of `samples`, in their order."""
    masks = [truth.mask(s.image_path) for s in samples]
    maps = normalize_per_category([upsample_token_map(records[key(s.image_path)]["token_map"], m.shape)
                                   for s, m in zip(samples, masks)])
    return masks, maps


def run_metrics_by_defect(queries, records: dict[str, dict], key, classes: dict[str, str],
                          defects: dict[str, str], truth) -> dict[str, float]:
    """Image and pixel AUROC of each local defect type of one category in one (k, seed) run, as
    {"<type>/image_auroc": x, "<type>/pixel_auroc": y}.

    The maps are normalised once over the normal and all local-defect images (as for `pixel_auroc`
    in `run_metrics_by_kind`), then each type's images are scored with the normal ones.
    """
    by_class = _queries_by_class(queries, key, classes)
    return _defect_metrics(by_class, records, key, defects, _local_masks_and_maps(by_class, records, key, truth))


def _defect_metrics(by_class: dict[str, list], records: dict[str, dict], key, defects: dict[str, str],
                    masks_and_maps) -> dict[str, float]:
    if masks_and_maps is None:
        return {}
    normal, local = by_class["normal"], by_class["local"]
    chosen, (masks, maps) = normal + local, masks_and_maps
    result = {}
    for defect in sorted({defects[key(s.image_path)] for s in local}):
        picked = [i for i, s in enumerate(chosen) if i < len(normal) or defects[key(s.image_path)] == defect]
        labels = [int(i >= len(normal)) for i in picked]
        scores = [records[key(chosen[i].image_path)]["score"] for i in picked]
        result[f"{defect}/image_auroc"] = image_metrics(labels, scores)["image_auroc"]
        result[f"{defect}/pixel_auroc"] = pixel_auroc([masks[i] for i in picked], [maps[i] for i in picked])
    return result


def metrics_by_kind(benchmark_dir: str | Path, root: str | Path, images_jsonl: str | Path,
                    map_size: int = 128, shots: list[int] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{"<k>": {metric: {"mean", "std"}}} over seeds, from `benchmark_dir`'s manifest.json and cache.

    `root` is the benchmark's dataset root (MVTec layout) and `images_jsonl` the factory's list of
    images with their defect class. `shots` restricts the k evaluated (default: all in the manifest).
    """
    classes = defect_classes(images_jsonl)
    return _over_categories_and_seeds(
        benchmark_dir, root, map_size, shots,
        lambda queries, records, key, truth: run_metrics_by_kind(queries, records, key, classes, truth),
        names=KIND_METRICS)


def metrics_by_defect(benchmark_dir: str | Path, root: str | Path, images_jsonl: str | Path,
                      map_size: int = 128, shots: list[int] | None = None
                      ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{"<k>": {"<defect type>": {"image_auroc" | "pixel_auroc": {"mean", "std"}}}} over seeds: the
    local defects by type, each averaged over the categories that have it. Arguments as in
    `metrics_by_kind`."""
    classes = defect_classes(images_jsonl)
    defects = defect_classes(images_jsonl, field="defect")
    return _by_defect_type(_over_categories_and_seeds(
        benchmark_dir, root, map_size, shots,
        lambda queries, records, key, truth: run_metrics_by_defect(queries, records, key, classes, defects, truth)))


def _by_defect_type(flat: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{"<k>": {"<type>/<metric>": summary}} -> {"<k>": {"<type>": {"<metric>": summary}}}."""
    nested: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for k, summaries in flat.items():
        nested[k] = {}
        for name, summary in sorted(summaries.items()):
            defect, metric = name.rsplit("/", 1)
            nested[k].setdefault(defect, {})[metric] = summary
    return nested


def category_metrics(benchmark_dir: str | Path, root: str | Path, map_size: int, shots: list[int] | None,
                     score_category):
    """Yield (k, seed, category, `score_category(queries, records, key, truth)`) for every category of
    every (k, seed) run of the benchmark in `benchmark_dir` (its manifest.json and cache), k in `shots`
    (default: every k of the manifest)."""
    benchmark_dir = Path(benchmark_dir)
    settings = DetectionSettings(model="", dataset="mvtec", root=str(root), out=str(benchmark_dir),
                                 manifest=str(benchmark_dir / "manifest.json"), map_size=map_size)
    plan = plan_benchmark(settings)
    truth = load_ground_truth(plan, map_size)
    cache = ScoreCache(benchmark_dir / "cache")
    for k, seed in plan.runs():
        if shots is not None and k not in shots:
            continue
        records = cache.load(k, seed)
        for name, category in plan.categories.items():
            queries = category.run_queries(k, seed)
            missing = [plan.key(s.image_path) for s in queries if plan.key(s.image_path) not in records]
            if missing:
                raise RuntimeError(f"{benchmark_dir}: {k}-shot seed {seed} has no score for {missing[0]} "
                                   f"(and {len(missing) - 1} more): the benchmark did not finish")
            yield k, seed, name, score_category(queries, records, plan.key, truth)


def _over_categories_and_seeds(benchmark_dir: str | Path, root: str | Path, map_size: int,
                               shots: list[int] | None, score_category, names: tuple[str, ...] = ()
                               ) -> dict[str, dict[str, dict[str, float]]]:
    """`score_category` (as in `category_metrics`) of every category of every (k, seed) run; each
    metric averaged over the categories that have it, then summarised over seeds (`_summarize`)."""
    return _summarize(((k, seed, values) for k, seed, _, values in
                       category_metrics(benchmark_dir, root, map_size, shots, score_category)), names)


def _summarize(per_category, names: tuple[str, ...] = ()) -> dict[str, dict[str, dict[str, float]]]:
    """{"<k>": {metric: {"mean", "std"}}} from (k, seed, {metric: value}) of every category: each metric
    averaged over the categories that have it, then summarised over seeds. `names` are reported even
    where no category has them (NaN: undefined), and so is a metric that one run has and another lacks."""
    per_run: dict[tuple[int, int], dict[str, list[float]]] = {}
    for k, seed, values in per_category:
        per_category_values = per_run.setdefault((k, seed), {name: [] for name in names})
        for name, value in values.items():
            per_category_values.setdefault(name, []).append(value)
    per_k: dict[int, list[dict[str, float]]] = {}
    for (k, _), per_category_values in per_run.items():
        per_k.setdefault(k, []).append({name: _mean_over_categories(v) for name, v in per_category_values.items()})
    summaries = {}
    for k, runs in sorted(per_k.items()):
        every_name = list(dict.fromkeys(name for run in runs for name in run))
        runs = [{name: run.get(name, float("nan")) for name in every_name} for run in runs]
        summaries[str(k)] = summarize_over_seeds(runs, ddof=0 if len(runs) == 1 else 1)
    return summaries


def paired_differences(model_dir: str | Path, baseline_dir: str | Path, root: str | Path,
                       images_jsonl: str | Path, map_size: int = 128, shots: list[int] | None = None
                       ) -> dict[str, dict[str, list[float]]]:
    """{"<k>": {metric: [model - baseline, one per (seed, category)]}} of the KIND_METRICS.

    Why paired: two methods scored on the same references and queries differ by much less than
    either varies from one draw (or one category) to the next, so the difference per draw and
    category, not the difference of the two means, says whether one method is ahead. Both
    benchmarks must have scored the same manifest (the quickstart runs its baseline on the model's);
    a (k, seed, category) that one has and the other lacks is an error, and so is a different query.
    A metric undefined for a category (it has no defect of that kind) gives no pair.
    """
    classes = defect_classes(images_jsonl)

    def by_run(folder):
        return {(k, seed, category): (values, [str(q.image_path) for q in queries])
                for k, seed, category, (values, queries) in category_metrics(
                    folder, root, map_size, shots,
                    lambda queries, records, key, truth: (run_metrics_by_kind(queries, records, key, classes, truth),
                                                          queries))}

    return _pair(by_run(model_dir), by_run(baseline_dir), model_dir, baseline_dir)


def _pair(model: dict, baseline: dict, model_dir, baseline_dir) -> dict[str, dict[str, list[float]]]:
    """`paired_differences` from each benchmark's {(k, seed, category): ({metric: value}, [query paths])}."""
    if model.keys() != baseline.keys():
        only = sorted(model.keys() ^ baseline.keys())[0]
        raise ValueError(f"{model_dir} and {baseline_dir} did not score the same runs: (k, seed, category) "
                         f"{only} is in only one of them. Score the baseline with the model's manifest.json.")
    differences: dict[str, dict[str, list[float]]] = {}
    for run in sorted(model):
        (ours, our_queries), (theirs, their_queries) = model[run], baseline[run]
        if our_queries != their_queries:
            raise ValueError(f"{model_dir} and {baseline_dir} scored different queries for (k, seed, category) "
                             f"{run}: score the baseline with the model's manifest.json.")
        per_k = differences.setdefault(str(run[0]), {name: [] for name in KIND_METRICS})
        for name in KIND_METRICS:
            if name in ours and np.isfinite(ours[name]) and np.isfinite(theirs[name]):
                per_k[name].append(ours[name] - theirs[name])
    return differences


def compare_benchmarks(model_dir: str | Path, baseline_dir: str | Path, root: str | Path, images_jsonl: str | Path,
                       map_size: int = 128, shots: list[int] | None = None) -> dict[str, dict]:
    """Everything a comparison of two benchmarks of the same manifest reports, in one pass over each
    benchmark's maps: {"<k>": {"model" | "baseline": `metrics_by_kind`, "by_defect": {"model" |
    "baseline": `metrics_by_defect`}, "paired": `paired_differences`}}, equal to those functions'
    results (each of which reads and normalises every map again)."""
    classes = defect_classes(images_jsonl)
    defects = defect_classes(images_jsonl, field="defect")

    def by_run(folder):
        return {(k, seed, category): result for k, seed, category, result in category_metrics(
            folder, root, map_size, shots,
            lambda queries, records, key, truth: (*run_metrics_by_kind_and_defect(queries, records, key, classes,
                                                                                  defects, truth),
                                                  [str(q.image_path) for q in queries]))}

    runs = {"model": by_run(model_dir), "baseline": by_run(baseline_dir)}
    paired = _pair(*({run: (kinds, queries) for run, (kinds, _, queries) in runs[method].items()}
                     for method in ("model", "baseline")), model_dir, baseline_dir)
    kinds = {method: _summarize([(k, seed, kind) for (k, seed, _), (kind, _, _) in found.items()], KIND_METRICS)
             for method, found in runs.items()}
    types = {method: _by_defect_type(_summarize([(k, seed, by_type) for (k, seed, _), (_, by_type, _) in found.items()]))
             for method, found in runs.items()}
    return {k: {"model": kinds["model"][k], "baseline": kinds["baseline"][k],
                "by_defect": {method: types[method].get(k, {}) for method in runs}, "paired": paired[k]}
            for k in paired}


def summarize_differences(differences: list[float]) -> dict[str, float]:
    """Mean, standard error of the mean (NaN below two pairs), count, and how many pairs are
    ahead (> 0) and behind (< 0)."""
    values = np.asarray(differences, dtype=np.float64)
    count = len(values)
    return {"mean": float(values.mean()) if count else float("nan"),
            "sem": float(values.std(ddof=1) / np.sqrt(count)) if count > 1 else float("nan"),
            "n": count, "ahead": int((values > 0).sum()), "behind": int((values < 0).sum())}
