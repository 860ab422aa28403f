"""The quickstart's phases, run in order and resumed from OUT/state.json."""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .budget import check_budget, evaluation_seconds, report_k, split_over_stages, training_seconds
from .report import report_document, report_markdown
from .settings import COSTS, QuickstartError, QuickstartPaths, QuickstartSettings, RunState, prepare_output

# --------------------------------------------------------------------------------------------------
# Progress


class PhaseProgress:
    """One bar over the phases; phases without a bar of their own show one here."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.tqdm = tqdm
        self.overall = tqdm(total=total, desc="quickstart", unit="phase", position=0, leave=True)

    def bar(self, total: int | None, desc: str, unit: str = "it"):
        return self.tqdm(total=total, desc=desc, unit=unit, leave=False)

    def advance(self, phase: str, skipped: bool) -> None:
        self.overall.set_postfix_str(f"{phase} {'(done before)' if skipped else 'done'}")
        self.overall.update(1)

    def close(self) -> None:
        self.overall.close()


class ProgressInspector:
    """An inspector that ticks a progress bar per scored query (the benchmark itself prints per run)."""

    def __init__(self, inspector, bar):
        self.inspector, self.bar = inspector, bar

    def inspect(self, queries, normals, *args, **kwargs):
        results = self.inspector.inspect(queries, normals, *args, **kwargs)
        self.bar.update(len(queries))
        return results


# --------------------------------------------------------------------------------------------------
# The phases


@dataclass
class Quickstart:
    """One run: its settings, folders, state and progress; `run()` executes the pending phases."""

    settings: QuickstartSettings
    paths: QuickstartPaths
    state: RunState
    progress: PhaseProgress | None = None
    say: Callable[[str], None] = print
    shared_data: bool = False
    """The data and initial model belong to another run (an ablation variant): never rebuilt here,
    and only the model is evaluated (no baseline, no report: the ablation table collects it)."""
    training_budget: float | None = None
    """Total training seconds, instead of what the budget leaves (ablation variants get the
    quickstart run's, so every row of the table trained for the same time)."""
    manifest: Path | None = None
    """Replay these references and queries instead of drawing them (ablation variants)."""
    phase_started: float = 0.0

    @property
    def preset(self):
        from ..model.checkpoint import PRESETS

        if self.settings.preset not in PRESETS:
            raise QuickstartError(f"unknown preset {self.settings.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        return PRESETS[self.settings.preset]

    def phases(self) -> list[tuple[str, Callable[[], dict | None]]]:
        s = self.settings
        chosen = []
        if not self.shared_data:
            chosen += [("factory", self.make_factory)]
        if self.paths.model is None:
            chosen += [("model", self.make_model)]
        if not self.shared_data:
            chosen += [(f"stage{i}_data", getattr(self, f"make_stage{i}_data")) for i in s.stages]
        chosen += [(f"train{i}", lambda i=i: self.train_stage(i)) for i in s.stages]
        chosen += [("detection", self.evaluate_model)]
        if not self.shared_data:
            chosen += [("baseline", self.evaluate_baseline), ("report", self.report)]
        return chosen

    def run(self) -> dict | None:
        """Run the pending phases; the report.json document (None for an ablation variant)."""
        phases = self.phases()
        self.progress = PhaseProgress(len(phases))
        try:
            for name, action in phases:
                if self.state.done(name):
                    self.say(f"[quickstart] {name}: done in an earlier session "
                             f"({self.state.document['phases'][name]['seconds']:.0f} s), skipped")
                    self.progress.advance(name, skipped=True)
                    continue
                started = self.phase_started = time.monotonic()
                info = action() or {}
                seconds = time.monotonic() - started
                self.state.finish(name, seconds, **info)
                self.say(f"[quickstart] {name}: {seconds:.1f} s (total {self.state.seconds() / 60:.1f} of "
                         f"{self.settings.minutes:g} min)")
                self.progress.advance(name, skipped=False)
        finally:
            self.progress.close()
            self.progress = None
        report = self.paths.out / "report.json"
        return json.loads(report.read_text()) if report.is_file() else None

    # -- data -------------------------------------------------------------------------------------
    def make_factory(self) -> dict:
        from ..data.factory import IN_CONTEXT_KINDS, make_synthetic

        s = self.settings
        bar = self.progress.bar(3, "factory", unit="set")
        train = make_synthetic(self.paths.factory, s.train_categories, seed=s.seed, image_size=s.image_size,
                               train_normals=s.train_normals, test_normals=s.train_test_normals,
                               test_anomalies_per_kind=s.train_anomalies_per_kind, workers=2)
        bar.update(1)
        if s.in_context_categories:
            extra = make_synthetic(self.paths.factory_in_context, s.in_context_categories, seed=s.seed,
                                   image_size=s.image_size, train_normals=s.train_normals,
                                   test_normals=s.train_test_normals,
                                   test_anomalies_per_kind=s.in_context_anomalies_per_kind,
                                   first_category=s.first_in_context_category, kinds=IN_CONTEXT_KINDS, workers=2)
            train.images += extra.images
        bar.update(1)
        held = make_synthetic(self.paths.held_out, s.held_out_categories, seed=s.seed, image_size=s.image_size,
                              train_normals=s.held_out_train_normals, test_normals=s.held_out_test_normals,
                              test_anomalies_per_kind=s.held_out_anomalies_per_kind,
                              first_category=s.first_held_out_category, workers=2)
        bar.update(1)
        bar.close()
        return {"train_images": train.images, "held_out_images": held.images}

    def make_model(self) -> dict:
        """The random starting checkpoint, and the seconds per benchmark query it takes (the budget's
        estimate of evaluation, measured before training changes nothing about the cost)."""
        from ..model.checkpoint import init_model

        init_model(self.paths.init_model, self.preset, seed=self.settings.seed)
        return {"query_seconds": self.time_inspection()}

    def time_inspection(self) -> dict[str, float]:
        """Seconds per query at k = 0 and k = max(shots), batched as the benchmark batches them."""
        import numpy as np
        from PIL import Image

        from ..inspection import Inspector
        from ..model.settings import merge_settings_dicts

        # with the settings the trained model will have (residuals, shifted exemplars): they cost time
        settings = merge_settings_dicts(self.settings.iadgpt, self.settings.eval_iadgpt)
        inspector = Inspector.from_pretrained(self.paths.init_model, batch_size=8, iadgpt=settings or None)
        rng = np.random.default_rng(0)
        side = self.settings.image_size
        images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(8)]
        timings = {}
        for k in (0, max(self.settings.shots)):
            inspector.inspect(images[:2], [images[:k]] * 2)  # warm-up
            started = time.perf_counter()
            inspector.inspect(images, [images[:k]] * len(images))
            timings[str(k)] = (time.perf_counter() - started) / len(images)
        return timings

    def sources(self):
        from ..data.builders import DatasetSource

        sources = [DatasetSource(name="factory", kind="mvtec", root=self.paths.factory.resolve())]
        if self.settings.in_context_categories:
            sources.append(DatasetSource(name="factory_in_context", kind="mvtec",
                                         root=self.paths.factory_in_context.resolve()))
        return sources

    def benchmark_images(self) -> set[Path]:
        from ..data.builders import DatasetSource, benchmark_test_images

        return benchmark_test_images([DatasetSource(name="held_out", kind="mvtec", root=self.paths.held_out.resolve())])

    def resize_rule(self):
        from ..data.tasks import ResizeRule

        preset = self.preset
        return ResizeRule(factor=preset.patch_size * 2, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)

    def make_stage1_data(self) -> dict:
        import itertools

        from ..data.builders import stage1_records, write_stage

        s = self.settings
        sources = self.sources()
        roots = {source.name: str(source.root) for source in sources}
        files = [(source.name, source.root / "captions.jsonl") for source in sources]
        captions = sum(1 for _, path in files for line in path.open() if line.strip())
        every = max(1, captions // max(s.stage1_records, 1))  # spread over all categories, not the first few
        records = itertools.islice((r for i, r in enumerate(stage1_records(files, s.seed, roots=roots)) if i % every == 0),
                                   s.stage1_records)
        info = write_stage(self.paths.stage_data(1), 1, roots, records,
                           self.benchmark_images(), config={"quickstart": s.document()},
                           progress_total=s.stage1_records)
        return {"records": info.num_records}

    def make_stage2_data(self) -> dict:
        from ..data.builders import (Stage2Options, SyntheticDefects, index_sources, stage2_records, stage_roots,
                                    with_replay, write_stage)

        s = self.settings
        out = self.paths.stage_data(2)
        held_out = self.benchmark_images()
        pools = index_sources(self.sources(), held_out)
        roots = stage_roots(out, self.sources())
        resize = self.resize_rule()
        records = stage2_records(pools, SyntheticDefects(out / "synthetic", pools),
                                 Stage2Options(records=s.stage2_records, resize=resize), s.seed)
        if s.stage2_replay > 0 and 1 in s.stages:
            roots, records = with_replay(roots, records, self.paths.stage_data(1), s.stage2_replay, s.seed, resize)
        info = write_stage(out, 2, roots, records, held_out, config={"quickstart": s.document()},
                           progress_total=s.stage2_records, pixels=resize)
        return {"records": info.num_records}

    def make_stage3_data(self) -> dict:
        from ..data.builders import Stage3Options, index_sources, load_captions, stage3_records, with_replay, write_stage

        s = self.settings
        held_out = self.benchmark_images()
        sources = self.sources()
        pools = index_sources(sources, held_out)
        roots = {source.name: str(source.root) for source in sources}
        resize = self.resize_rule()
        options = Stage3Options(records=s.stage3_records, localization_fraction=s.localization_fraction,
                                reasoning_fraction=s.reasoning_fraction, resize=resize)
        records = stage3_records(pools, options, s.seed, load_captions(sources))
        if s.stage3_replay > 0 and 2 in s.stages:
            roots, records = with_replay(roots, records, self.paths.stage_data(2), s.stage3_replay, s.seed, resize)
        info = write_stage(self.paths.stage_data(3), 3, roots, records, held_out, config={"quickstart": s.document()},
                           progress_total=s.stage3_records, pixels=resize)
        return {"records": info.num_records}

    # -- training ---------------------------------------------------------------------------------
    def training_plan(self) -> dict[str, float]:
        """Seconds per training stage, fixed once (before the first stage) and kept on resume."""
        if "training_seconds" not in self.state.plan and self.training_budget is not None:
            self.state.plan["training_seconds"] = {
                str(stage): seconds for stage, seconds in split_over_stages(self.settings, self.training_budget).items()}
            self.state.save()
        if "training_seconds" not in self.state.plan:
            s = self.settings
            timed = self.model_info().get("query_seconds") or {}
            k_max = str(max(s.shots))

            def forward(k: int) -> float:  # linear in k between the two timed points
                low, high = timed.get("0", COSTS.query_forward), timed.get(k_max, COSTS.query_forward)
                return low + (high - low) * k / max(int(k_max), 1)

            queries = self.held_out_query_count()
            evaluation = evaluation_seconds(s, queries, forward)
            seconds = training_seconds(s, self.state.seconds() + self.shared_seconds(), evaluation)
            self.state.plan["training_seconds"] = {str(k): v for k, v in seconds.items()}
            self.state.plan["evaluation_seconds_estimate"] = evaluation
            self.state.save()
            self.say("[quickstart] training plan: " + ", ".join(f"stage {k} {v / 60:.1f} min" for k, v in seconds.items())
                     + f" (evaluation estimated at {evaluation / 60:.1f} min)")
        return self.state.plan["training_seconds"]

    def model_info(self) -> dict:
        return self.state.document["phases"].get("model") or self.shared_phase("model") or {}

    def shared_phase(self, name: str) -> dict | None:
        """A phase of the run whose data this one shares (ablation variants)."""
        if not self.shared_data:
            return None
        main_state = self.paths.data_dir.parent / "state.json"
        return json.loads(main_state.read_text())["phases"].get(name) if main_state.is_file() else None

    def shared_seconds(self) -> float:
        """Data time a variant did not spend itself but that its budget still contains."""
        if not self.shared_data:
            return 0.0
        return sum((self.shared_phase(name) or {}).get("seconds", 0.0)
                   for name in ("factory", "model", "stage1_data", "stage2_data", "stage3_data"))

    def held_out_query_count(self) -> int:
        from ..evaluation.by_kind import defect_classes

        classes = defect_classes(self.paths.held_out / "images.jsonl")
        return sum(1 for key in classes if "/test/" in key)

    def stage_config(self, stage: int, max_steps: int, max_minutes: float | None):
        """The stage's settings as train/train.py reads them, written to OUT/configs/stage<N>.yaml."""
        import yaml

        from ..config import load_config
        from ..training.config import TrainConfig

        s = self.settings
        previous = [i for i in s.stages if i < stage]
        document = {
            "stage": stage,
            "model": str((self.paths.run(previous[-1]) if previous else self.paths.init_model).resolve()),
            "data": str(self.paths.stage_data(stage).resolve()),
            "output_dir": str(self.paths.run(stage).resolve()),
            "learning_rate": s.learning_rates[stage - 1],
            "warmup_ratio": 0.05,
            "global_batch_size": s.batch_size,
            "per_device_batch_size": s.batch_size,
            "max_steps": max_steps,
            "max_minutes": None if max_minutes is None else round(max_minutes, 3),
            # the probe's pace is a first estimate: the stage re-fits its steps to the minutes as it runs
            "fit_steps_to_minutes": max_minutes is not None,
            "freeze_vision": stage in s.frozen_vision_stages,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "max_length": 4096,
            "iadgpt": dict(s.iadgpt),
            "save_every": max(25, max_steps // 3),
            "keep_checkpoints": 1,
            "log_every": 5,
            "seed": s.seed,
            "num_workers": 1,
        }
        path = self.paths.config(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Stage {stage} of the quickstart; the same recipe runs it under accelerate:\n"
                        f"#   accelerate launch --config_file configs/accelerate/cpu_1proc.yaml train/train.py "
                        f"--config {path}\n" + yaml.safe_dump(document, sort_keys=False))
        return load_config(TrainConfig, path)

    def train_stage(self, stage: int) -> dict:
        from ..training.loop import train
        from ..training.trainer import checkpoint_dirs

        started = time.monotonic()
        seconds = self.training_plan()[str(stage)]
        key = f"train{stage}_steps"
        resume = key in self.state.plan  # planned in an earlier session that did not finish the stage
        if self.settings.stage_steps is not None:
            self.state.plan[key] = self.settings.stage_steps[stage - 1]
            self.state.save()
        elif not resume:
            probe = self.stage_config(stage, max_steps=1, max_minutes=seconds / 60)
            step_seconds = time_training_step(probe)
            # the probe's own time comes out of the stage's, not on top of the budget
            seconds = max(seconds - (time.monotonic() - started), COSTS.minimum_training)
            self.state.plan[key] = max(1, int(seconds / step_seconds))
            self.state.plan[f"train{stage}_step_seconds"] = step_seconds
            self.state.save()
        steps = self.state.plan[key]
        fixed = self.settings.stage_steps is not None
        cfg = self.stage_config(stage, max_steps=steps, max_minutes=None if fixed else seconds / 60)
        self.say(f"[quickstart] stage {stage}: {steps} steps of {self.settings.batch_size} samples"
                 + (" (fixed by stage_steps)" if fixed else f" in at most {seconds / 60:.1f} min"))
        train(cfg, resume=resume and bool(checkpoint_dirs(cfg.output_dir)))
        summary = json.loads((self.paths.run(stage) / "train_summary.json").read_text())
        losses = read_losses(self.paths.run(stage) / "metrics.jsonl")
        return {"steps": summary["steps"], "planned_steps": steps, "planned_seconds": round(seconds, 1),
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}

    @property
    def final_model(self) -> Path:
        return self.paths.run(max(self.settings.stages))

    # -- evaluation -------------------------------------------------------------------------------
    def detection_settings(self, out: Path, manifest: Path | None = None):
        from ..evaluation.detection import DetectionSettings

        s = self.settings
        return DetectionSettings(model=str(self.final_model.resolve()), dataset="mvtec",
                                 root=str(self.paths.held_out.resolve()), out=str(out), shots=list(s.shots),
                                 seeds=s.seeds, manifest=str(manifest) if manifest else None, batch_size=8,
                                 map_size=s.image_size, overlays_per_category=2)

    def run_benchmark(self, settings, inspector, desc: str) -> None:
        from tqdm.auto import tqdm

        from ..evaluation.detection import plan_benchmark, run_detection

        plan = plan_benchmark(settings)
        total = sum(len(c.run_queries(k, seed)) for k, seed in plan.runs() for c in plan.categories.values())
        bar = self.progress.bar(total, desc, unit="query") if self.progress else tqdm(total=total, desc=desc)
        try:
            run_detection(settings, inspector=ProgressInspector(inspector, bar))
        finally:
            bar.close()

    def evaluate(self, out: Path, manifest: Path | None = None, eval_iadgpt: dict | None = None,
                 desc: str = "detection (model)", model: Path | None = None) -> None:
        """The benchmark of the final model (or `model`) on drawn references, or those of `manifest`,
        into `out`."""
        from ..inspection import Inspector
        from ..model.settings import merge_settings_dicts

        overrides = merge_settings_dicts(self.settings.eval_iadgpt, eval_iadgpt)
        inspector = Inspector.from_pretrained(model or self.final_model, batch_size=8, iadgpt=overrides or None)
        self.run_benchmark(self.detection_settings(out, manifest), inspector, desc)

    def evaluate_model(self) -> dict:
        self.evaluate(self.paths.model_eval, self.manifest)
        return {}

    def model_settings(self) -> dict:
        """The final model's IADGPT settings as saved in its config."""
        return json.loads((self.final_model / "config.json").read_text()).get("iadgpt") or {}

    def evaluate_baseline(self) -> dict:
        from ..evaluation.baseline import NearestPatchInspector

        settings = self.detection_settings(self.paths.baseline_eval, manifest=self.paths.model_eval / "manifest.json")
        self.run_benchmark(settings, NearestPatchInspector(), "detection (baseline)")
        return {}

    def kind_metrics(self, by=None) -> dict:
        """{"model" | "baseline": metrics_by_kind(...)} of the two benchmarks (`by=metrics_by_defect`
        for the local defects by type)."""
        from ..evaluation.by_kind import metrics_by_kind

        by = by or metrics_by_kind
        return {method: by(folder, self.paths.held_out, self.paths.held_out / "images.jsonl",
                           map_size=self.settings.image_size)
                for method, folder in (("model", self.paths.model_eval), ("baseline", self.paths.baseline_eval))}

    def paired_with_baseline(self) -> dict:
        """{"<k>": {metric: [model - baseline per (draw, category)]}} at the report's k
        (`iadgpt.evaluation.by_kind.paired_differences`)."""
        from ..evaluation.by_kind import paired_differences

        return paired_differences(self.paths.model_eval, self.paths.baseline_eval, self.paths.held_out,
                                  self.paths.held_out / "images.jsonl", map_size=self.settings.image_size,
                                  shots=[report_k(self.settings)])

    def report(self) -> dict:
        from ..evaluation.by_kind import metrics_by_defect

        metrics = self.kind_metrics()
        # At one k only: per (k, seed) run the types cost about three times the kinds (measured on a
        # 15-minute run: 14 s for both methods at k = 2, against 18 s for the kinds at every k).
        by_defect = self.kind_metrics(by=functools.partial(metrics_by_defect, shots=[report_k(self.settings)]))
        paired = self.paired_with_baseline()
        chat = self.example_chat()
        # Everything up to now, this phase included (its own seconds are recorded after it returns).
        seconds = self.state.seconds() + self.shared_seconds() + time.monotonic() - self.phase_started
        document = report_document(metrics, seconds / 60, by_defect, paired)
        (self.paths.out / "report.md").write_text(report_markdown(self, metrics, document, chat, by_defect))
        (self.paths.out / "report.json").write_text(json.dumps(document, indent=2) + "\n")
        return {}

    def example_chat(self) -> list[tuple[str, str]]:
        """A short conversation about one held-out local defect, its overlay saved beside it."""
        from ..data.samples import load_image
        from ..inspection import Inspector, heatmap_overlay

        manifest = json.loads((self.paths.model_eval / "manifest.json").read_text())
        classes = _defect_classes(self.paths.held_out)
        k = str(report_k(self.settings))
        cache = _scores(self.paths.model_eval, int(k), 0)
        candidates = [(cache[q], name, q) for name, entry in manifest["categories"].items()
                      for q in entry["queries"] if classes.get(q) == "local" and q in cache]
        _, category, query_key = max(candidates)  # the defect the model is surest of: a readable example
        root = self.paths.held_out
        references = [load_image(root / key) for key in manifest["categories"][category]["references"][k]["0"]]
        query = load_image(root / query_key)
        inspector = Inspector.from_pretrained(self.final_model, batch_size=1, iadgpt=self.settings.eval_iadgpt or None)
        [result] = inspector.inspect([query], [references])
        heatmap_overlay(query, result.anomaly_map).save(self.paths.out / "chat_query.png")
        from ..data.tasks import REASONING_QUESTION

        questions = [inspector.question.text, REASONING_QUESTION]
        answers = ask_each(inspector, query, references, questions)
        transcript = [("system", f"{category}: query {query_key}, {k} normal references "
                                 f"{', '.join(manifest['categories'][category]['references'][k]['0'])}; "
                                 f"anomaly score {result.score:.3f}; heatmap: chat_query.png")]
        transcript += [pair for q, a in zip(questions, answers) for pair in (("user", q), ("iadgpt", a))]
        (self.paths.out / "chat.md").write_text(
            "# Example chat about a held-out defect\n\n" + "\n\n".join(f"**{who}**: {text}" for who, text in transcript)
            + "\n")
        return transcript


def ask_each(inspector, query, references, questions: list[str]) -> list[str]:
    """Each question asked as the first turn of its own conversation (the layout training taught)."""
    from ..dialogue import Dialogue, reply

    return [reply(inspector.model, inspector.processor, [Dialogue(query, list(references))], [question],
                  max_new_tokens=64)[0] for question in questions]


def _defect_classes(root: Path) -> dict[str, str]:
    from ..evaluation.by_kind import defect_classes

    return defect_classes(root / "images.jsonl")


def _scores(benchmark: Path, k: int, seed: int) -> dict[str, float]:
    from ..evaluation.detection import ScoreCache

    return {key: record["score"] for key, record in ScoreCache(benchmark / "cache").load(k, seed).items()}


def read_losses(metrics_jsonl: Path) -> list[float]:
    if not metrics_jsonl.is_file():
        return []
    return [json.loads(line)["loss"] for line in metrics_jsonl.read_text().splitlines() if line.strip()]


def time_training_step(cfg, batches: int = 6) -> float:
    """Seconds per optimizer step of this stage: forward and backward of a few batches of its own
    records with its own model (the first one is warm-up and not counted). The mean, not the
    median: records differ a lot in cost (1 to 5 images, answers of 2 to 100 tokens)."""
    from torch.utils.data import DataLoader

    from ..data.records import StageInfo, read_records
    from ..training.collator import RecordCollator
    from ..training.trainer import build_model, epoch_order

    model, processor = build_model(cfg, main_process=False)
    info = StageInfo.read(Path(cfg.data))
    records = [json.loads(r.to_json()) for r in read_records(Path(cfg.data))]
    order = epoch_order(len(records), cfg.seed + 1, 0)[: batches * cfg.per_device_batch_size]
    loader = DataLoader([records[i] for i in order], batch_size=cfg.per_device_batch_size,
                        collate_fn=RecordCollator(processor, info))
    times = []
    model.train()
    for batch in loader:
        started = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - started)
    del model
    steps_per_optimizer_step = cfg.global_batch_size // cfg.per_device_batch_size
    optimizer_overhead = 1.15  # AdamW update, logging and the data worker's share of a core
    return statistics.mean(times[1:] or times) * steps_per_optimizer_step * optimizer_overhead



# --------------------------------------------------------------------------------------------------
# Entry points


def run_quickstart(out: str | os.PathLike, settings: QuickstartSettings | None = None, overwrite: bool = False,
                   say: Callable[[str], None] = print) -> dict:
    """Run (or resume) a quickstart in `out`; returns the report.json document."""
    import torch

    settings = settings or QuickstartSettings()
    out = Path(out)
    check_budget(settings)
    prepare_output(out, settings, overwrite)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(settings.threads)
    state = RunState(out / "state.json", settings.document())
    state.save()
    return Quickstart(settings, QuickstartPaths(out), state, say=say).run()
