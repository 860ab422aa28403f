"""`iadgpt quickstart`: the whole IADGPT pipeline on one CPU within a wall-time budget, and the
evidence that its training teaches a Qwen2.5-VL model to inspect products it has never seen.

    iadgpt quickstart --out runs/quickstart                 # 15 minutes on 2 CPU cores
    iadgpt quickstart --out runs/quickstart --ablations     # then the ablation table (longer)

Phases, in order; each is recorded in OUT/state.json when it finishes, so a rerun of the same
command skips what is done (an interrupted training stage resumes from its last checkpoint):

  factory       synthetic products (`iadgpt.data.factory`): many training categories with few images
                each, and disjoint held-out categories (indices from 10000) for the benchmark
  model         a random-weight Qwen2.5-VL of the `small` preset; times inference for the budget
  stage1_data   caption records; stage2_data: discrepancy tasks; stage3_data: few-shot detection,
                localisation and reasoning (the library functions behind data_builders/)
  train1..3     the training loop users launch with accelerate (`iadgpt.training.loop.train`), each
                stage from a YAML written to OUT/configs/ that train/train.py reads unchanged
  detection     the few-shot benchmark (`run_detection`) on the held-out categories, k = 0, 1, 2, 4
  baseline      nearest-patch matching (PatchCore-style) on the same manifest, through the same benchmark
  report        OUT/report.json + report.md by defect kind and local defect type (`iadgpt.evaluation.by_kind`),
                an example chat

The budget (`--minutes`) is kept by shortening training, never by overrunning: data phases are
measured as they run, evaluation is estimated from timed forward passes of the untrained model, and
what is left is split over the training stages (stage_shares). Each stage first times a few
batches for a first step count, then re-fits the count to its minutes from the pace it measures
as it trains (`fit_steps_to_minutes`), so the cosine schedule completes even when the probe ran on a
busy machine; `max_minutes` is the hard stop. A budget that leaves too little training time is
refused before any work starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .evaluation.reports import json_ready

QUICKSTART_FORMAT = "iadgpt-quickstart/1"
OWNED_ENTRIES = ("state.json", "data", "model", "configs", "runs", "eval", "report.json", "report.md", "chat.md",
                 "chat_query.png", "ablations", "wider")
"""What a quickstart writes under OUT: --overwrite removes these and nothing else."""


class QuickstartError(ValueError):
    """The quickstart cannot run as asked (output folder, settings); the message says what to change."""


class BudgetTooShortError(QuickstartError):
    """The wall-time budget leaves no time to train."""


@dataclass
class QuickstartSettings:
    """Everything that defines one quickstart run; stored in OUT/state.json (a rerun with other
    settings is a different run, refused without --overwrite)."""

    minutes: float = 15.0
    """Wall-time budget of the whole run; training gets what data and evaluation leave."""
    seed: int = 0
    """Seeds the factory, the records, the initial weights and the few-shot draws."""
    preset: str = "small"
    """Model size (`iadgpt.model.checkpoint.PRESETS`)."""
    image_size: int = 128
    """Side of the factory's square images."""
    train_categories: int = 300
    """Training categories: many, each with few images, generalise better than a fixed few."""
    train_normals: int = 6
    """Normal training images per training category (exemplars and normal queries)."""
    train_test_normals: int = 2
    """Extra normal images per training category (normal queries)."""
    train_anomalies_per_kind: int = 1
    """Defective images per defect kind and training category."""
    in_context_categories: int = 0
    """Further training categories with in-context-only defects (wrong colour, count or pattern)
    and no local ones, so that comparing against the exemplars is a large share of what stage 3
    asks; 0: only the categories above, where these are 1-2 of ~9 defect kinds."""
    in_context_anomalies_per_kind: int = 3
    """Defective images per in-context kind and such category."""
    first_in_context_category: int = 5_000
    """Index of the first of those categories (disjoint from the others and the held-out ones)."""
    held_out_categories: int = 9
    """Held-out categories of the benchmark (9 covers every product family once)."""
    first_held_out_category: int = 10_000
    """Index of the first held-out category; the factory draws category i from (seed, i) only."""
    held_out_train_normals: int = 8
    """Normal images per held-out category that references are drawn from."""
    held_out_test_normals: int = 8
    """Normal queries per held-out category."""
    held_out_anomalies_per_kind: int = 2
    """Defective queries per defect kind and held-out category."""
    stage1_records: int = 2000
    """Caption records (stage 1)."""
    stage2_records: int = 1500
    """Discrepancy records (stage 2)."""
    stage3_records: int = 8000
    """Few-shot records (stage 3); more than a stage can use in its minutes, so it never repeats."""
    localization_fraction: float = 0.1
    """Share of stage-3 defective queries asked "where" (boxes) instead of "whether"."""
    reasoning_fraction: float = 0.05
    """Share of stage-3 defective queries asked to describe the defect (answered with its caption)."""
    stage2_replay: float = 0.0
    """Share of stage-1 records mixed into stage 2 (paper: 0.5). 0 by default, so that the ablations
    without stage 1 or 2 see none of that stage's data at all."""
    stage3_replay: float = 0.0
    """Share of stage-2 records mixed into stage 3 (paper: 0.8); 0 by default, as above."""
    stages: tuple[int, ...] = (1, 2, 3)
    """Training stages to run (ablations drop 1 or 2; the remaining ones get the time)."""
    stage_shares: tuple[float, float, float] = (0.15, 0.15, 0.7)
    """Shares of the training time of stages 1, 2, 3 (renormalised over `stages`)."""
    stage_steps: tuple[int, int, int] | None = None
    """Optimizer steps of stages 1, 2, 3, fixed instead of fitted to each stage's minutes: the same
    training on any machine, however busy (tests; comparisons across machines). The budget then
    shortens nothing: each stage trains all its steps (and ablation variants train the same steps
    per remaining stage, not the same minutes)."""
    frozen_vision_stages: tuple[int, ...] = (1, 2)
    """Stages whose vision encoder (patch embedding and blocks) is frozen; the patch merger and the
    fusion weights still train. Why stages 1 and 2: a random encoder's patches (near a random
    projection of the pixels) match a reference's patches better than after a few minutes of
    captions and discrepancy tasks have trained them; stage 3 then trains the encoder through the
    in-context residuals it is compared by (docs/quickstart.md). () trains everything; the paper
    freezes its pretrained encoder in stage 3 only."""
    learning_rates: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)
    """Peak AdamW learning rates of stages 1, 2, 3: a random model learns from scratch, so these are
    far above the paper's fine-tuning rates."""
    batch_size: int = 8
    """Samples per optimizer step."""
    iadgpt: dict = field(default_factory=lambda: {"in_context_residuals": True, "residual_scores": True,
                                                 "exemplar_shifts": 3, "score_loss_weight": 1.0,
                                                 "query_shifts": 3, "map_attention_weight": 0.0,
                                                 "image_score_map_weight": 0.75})
    """IADGPT setting overrides for every stage. Default: the in-context residuals, their evidence in
    the scores, half-patch-shifted exemplars in their patch bank, and a map drawn from the evidence
    alone on a half-patch lattice wherever there are exemplars (all beyond the paper), with the
    Yes/No score loss, and the image score fused with the map's maximum (`image_score_map_weight`,
    inference only). docs/model.md has what each of them changed. {} trains the paper's model."""
    shots: tuple[int, ...] = (0, 1, 2, 4)
    """Numbers of normal references k of the benchmark."""
    seeds: int = 2
    """Few-shot draws per k > 0."""
    eval_iadgpt: dict = field(default_factory=dict)
    """IADGPT setting overrides at evaluation only (e.g. {"exemplar_retention": 0.4})."""
    threads: int = 1
    """Torch compute threads. One, with one data-loading process beside it, is robust on 2 shared
    cores: a second compute thread waiting for a busy core slows every step several-fold."""

    def __post_init__(self):
        self.stages = tuple(int(s) for s in self.stages)
        self.frozen_vision_stages = tuple(int(s) for s in self.frozen_vision_stages)
        self.shots = tuple(int(k) for k in self.shots)
        self.stage_shares = tuple(float(v) for v in self.stage_shares)
        if self.stage_steps is not None:
            self.stage_steps = tuple(int(v) for v in self.stage_steps)
            if len(self.stage_steps) != 3 or min(self.stage_steps) < 1:
                raise QuickstartError(f"stage_steps must be three positive step counts (stages 1, 2, 3), "
                                      f"got {self.stage_steps}")
        self.learning_rates = tuple(float(v) for v in self.learning_rates)
        if self.minutes <= 0:
            raise QuickstartError(f"--minutes must be positive, got {self.minutes}")
        if not self.stages or not set(self.stages) <= {1, 2, 3} or 3 not in self.stages:
            raise QuickstartError(f"stages must include 3 and be a subset of 1, 2, 3; got {self.stages}")
        if not set(self.frozen_vision_stages) <= {1, 2, 3}:
            raise QuickstartError(f"frozen_vision_stages must be a subset of 1, 2, 3; got {self.frozen_vision_stages}")

    def document(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def identity(self) -> dict:
        """What makes two runs the same run: everything but the speed knob `threads`."""
        return {k: v for k, v in self.document().items() if k != "threads"}


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work on a 2-core CPU, measured on the project's machine.

    Used twice: before any work, to refuse a budget that cannot fit data, evaluation and a minimum
    of training; and before training, for the parts not yet measured (metrics, baseline, report).
    """

    factory_image: float = 0.007
    """One factory image (2 processes)."""
    record: float = 0.002
    """One stage record of stage 1 or 3 (paths and text only)."""
    stage2_record: float = 0.012
    """One stage-2 record (half of them synthesise and write a defect image)."""
    stage_overhead: float = 8.0
    """Per training stage: loading, record checks, step timing, saving."""
    query_forward: float = 0.035
    """One benchmark query at k = 2 (before the model phase times it)."""
    map_metrics: float = 0.006
    """Metrics and overlays per scored query: the benchmark's, then the report's by defect kind."""
    baseline_query: float = 0.01
    """One nearest-patch baseline query (the references' memory bank is built once per category)."""
    defect_metrics: float = 0.013
    """Per scored query of the report's k, per method: the local defects by type (`report_k`)."""
    report: float = 6.0
    """The example chat and writing the report."""
    minimum_training: float = 10.0
    """Least training, in seconds per stage, worth running."""


COSTS = CostModel()


# --------------------------------------------------------------------------------------------------
# Paths and state


@dataclass(frozen=True)
class QuickstartPaths:
    """Where a run keeps everything. Ablation variants point `data` and `model` at the main run's."""

    out: Path
    data: Path | None = None
    model: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.data or self.out / "data"

    @property
    def factory(self) -> Path:
        return self.data_dir / "factory"

    @property
    def factory_in_context(self) -> Path:
        return self.data_dir / "factory_in_context"

    @property
    def held_out(self) -> Path:
        return self.data_dir / "held_out"

    def stage_data(self, stage: int) -> Path:
        return self.data_dir / f"stage{stage}"

    @property
    def init_model(self) -> Path:
        return (self.model or self.out / "model") / "init"

    def config(self, stage: int) -> Path:
        return self.out / "configs" / f"stage{stage}.yaml"

    def run(self, stage: int) -> Path:
        return self.out / "runs" / f"stage{stage}"

    @property
    def model_eval(self) -> Path:
        return self.out / "eval" / "model"

    @property
    def baseline_eval(self) -> Path:
        return self.out / "eval" / "baseline"

    @property
    def state(self) -> Path:
        return self.out / "state.json"

    @classmethod
    def of_finished_run(cls, out: str | os.PathLike) -> tuple[QuickstartPaths, Path]:
        """The paths of a finished quickstart run or ablation variant (OUT/ablations/<name>, which
        shares OUT's data and is compared with OUT's baseline), and the baseline benchmark to compare
        its model with."""
        out = Path(out)
        main = out.parent.parent if out.parent.name == "ablations" else out
        paths = cls(out, data=main / "data", model=main / "model")
        baseline = cls(main).baseline_eval
        for folder in (paths.model_eval, baseline, paths.held_out):
            if not (folder / ("images.jsonl" if folder == paths.held_out else "manifest.json")).exists():
                raise QuickstartError(f"{out} is not a finished quickstart run or ablation variant: {folder} "
                                      "is missing or incomplete")
        return paths, baseline


class RunState:
    """OUT/state.json: the settings of the run, its finished phases and its plan, written atomically."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        if path.is_file():
            self.document = json.loads(path.read_text())
        else:
            self.document = {"format": QUICKSTART_FORMAT, "settings": settings, "phases": {}, "plan": {}}

    def done(self, phase: str) -> bool:
        return phase in self.document["phases"]

    def finish(self, phase: str, seconds: float, **info) -> None:
        self.document["phases"][phase] = {"seconds": round(seconds, 2), **info}
        self.save()

    @property
    def plan(self) -> dict:
        return self.document["plan"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.document, indent=2))
        os.replace(tmp, self.path)

    def seconds(self) -> float:
        return sum(p["seconds"] for p in self.document["phases"].values())


def prepare_output(out: Path, settings: QuickstartSettings, overwrite: bool) -> None:
    """Resume a run with the same settings; refuse a folder holding anything else unless `overwrite`
    (which removes only what a quickstart writes, never other files)."""
    state_file = out / "state.json"
    if state_file.is_file():
        try:
            previous = json.loads(state_file.read_text())
        except json.JSONDecodeError as err:
            raise QuickstartError(f"{state_file} is not valid JSON ({err}); pass --overwrite to start afresh")
        old = {k: v for k, v in (previous.get("settings") or {}).items() if k != "threads"}
        new = settings.identity()
        if old == new:
            return
        if not overwrite:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
            raise QuickstartError(f"{out} holds a different quickstart run ({details}); pass --overwrite to replace "
                                  "it or choose another --out")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuickstartError(f"{out} is not empty and holds no quickstart run; choose an empty or new --out "
                              "(or pass --overwrite to replace quickstart outputs in it)")
    if overwrite:
        for name in OWNED_ENTRIES:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Budget


def held_out_queries_estimate(settings: QuickstartSettings) -> int:
    """Test images of the held-out categories, before the factory has made them."""
    from .data.factory import LOCAL_KINDS

    kinds = len(LOCAL_KINDS) + 1.5  # in-context: wrong_color everywhere, count or pattern in 4 of 9 families
    per_category = settings.held_out_test_normals + kinds * settings.held_out_anomalies_per_kind
    return round(settings.held_out_categories * per_category)


def evaluation_seconds(settings: QuickstartSettings, queries: int, forward: Callable[[int], float]) -> float:
    """Benchmark, baseline and report time for `queries` test images, `forward(k)` s per query."""
    runs = [(k, 1 if k == 0 else settings.seeds) for k in settings.shots]
    scoring = sum(seeds * queries * forward(k) for k, seeds in runs)
    metrics = sum(seeds for _, seeds in runs) * queries * COSTS.map_metrics
    baseline = sum(seeds * queries * COSTS.baseline_query for k, seeds in runs)
    by_defect = 2 * dict(runs)[report_k(settings)] * queries * COSTS.defect_metrics  # model and baseline
    paired = 2 * dict(runs)[report_k(settings)] * queries * COSTS.map_metrics  # both again, per category
    return scoring + 4 * metrics + baseline + by_defect + paired + COSTS.report  # metrics: model and baseline, benchmark and report


def report_k(settings: QuickstartSettings) -> int:
    """The k of the report's example chat and of its defect types: the targets' 2 if evaluated."""
    return 2 if 2 in settings.shots else max(settings.shots)


def data_seconds(settings: QuickstartSettings) -> float:
    """Factory and stage-data time, before they have run."""
    from .data.factory import LOCAL_KINDS

    per_train_category = settings.train_normals + settings.train_test_normals + \
        (len(LOCAL_KINDS) + 1.5) * settings.train_anomalies_per_kind
    per_in_context_category = settings.train_normals + settings.train_test_normals + \
        1.5 * settings.in_context_anomalies_per_kind
    images = settings.train_categories * per_train_category + held_out_queries_estimate(settings) + \
        settings.held_out_categories * settings.held_out_train_normals + \
        settings.in_context_categories * per_in_context_category
    records = settings.stage1_records * (1 in settings.stages) + settings.stage3_records
    return images * COSTS.factory_image + records * COSTS.record + \
        settings.stage2_records * COSTS.stage2_record * (2 in settings.stages)


def check_budget(settings: QuickstartSettings) -> None:
    """Refuse, before any work, a budget that cannot hold data, evaluation and a little training."""
    fixed = data_seconds(settings) + evaluation_seconds(settings, held_out_queries_estimate(settings),
                                                        lambda k: COSTS.query_forward * (1 + k) / 3)
    fixed += COSTS.stage_overhead * len(settings.stages)
    needed = fixed + COSTS.minimum_training * len(settings.stages)
    if settings.minutes * 60 < needed:
        raise BudgetTooShortError(
            f"a budget of {settings.minutes:g} minutes is too short to train anything: data and evaluation alone "
            f"take about {fixed / 60:.1f} minutes, and training needs at least "
            f"{COSTS.minimum_training * len(settings.stages) / 60:.1f} more; use --minutes {needed / 60 + 0.5:.0f} "
            "or more")


def training_seconds(settings: QuickstartSettings, elapsed: float, evaluation: float) -> dict[int, float]:
    """Seconds of each training stage: what the budget leaves after the time spent and evaluation."""
    left = settings.minutes * 60 - elapsed - evaluation - COSTS.stage_overhead * len(settings.stages)
    left *= 0.97  # headroom for the run-to-run jitter of a shared machine
    minimum = COSTS.minimum_training * len(settings.stages)
    if left < minimum:
        raise BudgetTooShortError(
            f"after {elapsed / 60:.1f} minutes of data preparation and with about {evaluation / 60:.1f} minutes of "
            f"evaluation ahead, a budget of {settings.minutes:g} minutes leaves {max(left, 0) / 60:.1f} minutes for "
            f"training, less than the {minimum / 60:.1f} it needs; use a larger --minutes")
    return split_over_stages(settings, left)


def split_over_stages(settings: QuickstartSettings, seconds: float) -> dict[int, float]:
    """`seconds` of training shared by the stages in proportion to their `stage_shares`."""
    shares = {stage: settings.stage_shares[stage - 1] for stage in settings.stages}
    total = sum(shares.values())
    return {stage: seconds * share / total for stage, share in shares.items()}


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
        from .model.checkpoint import PRESETS

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
        from .data.factory import IN_CONTEXT_KINDS, make_synthetic

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
        from .model.checkpoint import init_model

        init_model(self.paths.init_model, self.preset, seed=self.settings.seed)
        return {"query_seconds": self.time_inspection()}

    def time_inspection(self) -> dict[str, float]:
        """Seconds per query at k = 0 and k = max(shots), batched as the benchmark batches them."""
        import numpy as np
        from PIL import Image

        from .inspection import Inspector

        # with the settings the trained model will have (residuals, shifted exemplars): they cost time
        settings = {**self.settings.iadgpt, **self.settings.eval_iadgpt}
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
        from .data.builders import DatasetSource

        sources = [DatasetSource(name="factory", kind="mvtec", root=self.paths.factory.resolve())]
        if self.settings.in_context_categories:
            sources.append(DatasetSource(name="factory_in_context", kind="mvtec",
                                         root=self.paths.factory_in_context.resolve()))
        return sources

    def benchmark_images(self) -> set[Path]:
        from .data.builders import DatasetSource, benchmark_test_images

        return benchmark_test_images([DatasetSource(name="held_out", kind="mvtec", root=self.paths.held_out.resolve())])

    def resize_rule(self):
        from .data.tasks import ResizeRule

        preset = self.preset
        return ResizeRule(factor=preset.patch_size * 2, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)

    def make_stage1_data(self) -> dict:
        import itertools

        from .data.builders import stage1_records, write_stage

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
        from .data.builders import (Stage2Options, SyntheticDefects, index_sources, stage2_records, stage_roots,
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
        from .data.builders import Stage3Options, index_sources, load_captions, stage3_records, with_replay, write_stage

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
        from .evaluation.by_kind import defect_classes

        classes = defect_classes(self.paths.held_out / "images.jsonl")
        return sum(1 for key in classes if "/test/" in key)

    def stage_config(self, stage: int, max_steps: int, max_minutes: float | None):
        """The stage's settings as train/train.py reads them, written to OUT/configs/stage<N>.yaml."""
        import yaml

        from .config import load_config
        from .training.config import TrainConfig

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
        from .training.loop import train
        from .training.trainer import checkpoint_dirs

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
        from .evaluation.detection import DetectionSettings

        s = self.settings
        return DetectionSettings(model=str(self.final_model.resolve()), dataset="mvtec",
                                 root=str(self.paths.held_out.resolve()), out=str(out), shots=list(s.shots),
                                 seeds=s.seeds, manifest=str(manifest) if manifest else None, batch_size=8,
                                 map_size=s.image_size, overlays_per_category=2)

    def run_benchmark(self, settings, inspector, desc: str) -> None:
        from tqdm.auto import tqdm

        from .evaluation.detection import plan_benchmark, run_detection

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
        from .inspection import Inspector

        overrides = {**self.settings.eval_iadgpt, **(eval_iadgpt or {})}
        inspector = Inspector.from_pretrained(model or self.final_model, batch_size=8, iadgpt=overrides or None)
        self.run_benchmark(self.detection_settings(out, manifest), inspector, desc)

    def evaluate_model(self) -> dict:
        self.evaluate(self.paths.model_eval, self.manifest)
        return {}

    def model_settings(self) -> dict:
        """The final model's IADGPT settings as saved in its config."""
        return json.loads((self.final_model / "config.json").read_text()).get("iadgpt") or {}

    def evaluate_baseline(self) -> dict:
        from .evaluation.baseline import NearestPatchInspector

        settings = self.detection_settings(self.paths.baseline_eval, manifest=self.paths.model_eval / "manifest.json")
        self.run_benchmark(settings, NearestPatchInspector(), "detection (baseline)")
        return {}

    def kind_metrics(self, by=None) -> dict:
        """{"model" | "baseline": metrics_by_kind(...)} of the two benchmarks (`by=metrics_by_defect`
        for the local defects by type)."""
        from .evaluation.by_kind import metrics_by_kind

        by = by or metrics_by_kind
        return {method: by(folder, self.paths.held_out, self.paths.held_out / "images.jsonl",
                           map_size=self.settings.image_size)
                for method, folder in (("model", self.paths.model_eval), ("baseline", self.paths.baseline_eval))}

    def paired_with_baseline(self) -> dict:
        """{"<k>": {metric: [model - baseline per (draw, category)]}} at the report's k
        (`iadgpt.evaluation.by_kind.paired_differences`)."""
        from .evaluation.by_kind import paired_differences

        return paired_differences(self.paths.model_eval, self.paths.baseline_eval, self.paths.held_out,
                                  self.paths.held_out / "images.jsonl", map_size=self.settings.image_size,
                                  shots=[report_k(self.settings)])

    def report(self) -> dict:
        from .evaluation.by_kind import metrics_by_defect

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
        from .data.samples import load_image
        from .inspection import Inspector, heatmap_overlay

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
        from .data.tasks import REASONING_QUESTION

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
    from .dialogue import Dialogue, reply

    return [reply(inspector.model, inspector.processor, [Dialogue(query, list(references))], [question],
                  max_new_tokens=64)[0] for question in questions]


def _defect_classes(root: Path) -> dict[str, str]:
    from .evaluation.by_kind import defect_classes

    return defect_classes(root / "images.jsonl")


def _scores(benchmark: Path, k: int, seed: int) -> dict[str, float]:
    from .evaluation.detection import ScoreCache

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

    from .data.records import StageInfo, read_records
    from .training.collator import RecordCollator
    from .training.trainer import build_model, epoch_order

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
        from .evaluation.by_kind import summarize_differences

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
    from .evaluation.by_kind import KIND_METRICS, summarize_differences

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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="output folder (rerunning the same command resumes)")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-time budget (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and few-shot draws")
    parser.add_argument("--overwrite", action="store_true", help="replace a different quickstart run in --out")
    parser.add_argument("--ablations", action="store_true",
                        help="after the quickstart, train and evaluate the ablation variants (each takes about "
                             "the quickstart's own time; then 6 rows evaluated only: the answer-only image score and 5 "
                             "exemplar retentions)")
    parser.add_argument("--variants", default=None,
                        help="with --ablations: only these comma-separated variants (to share the work between "
                             "processes; a final --ablations without it writes the whole table)")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (default 1, see docs)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .ablations import check_variants, run_ablations

    settings = QuickstartSettings(minutes=args.minutes, seed=args.seed, threads=args.threads)
    variants = args.variants.split(",") if args.variants else None
    try:
        if variants is not None and not args.ablations:
            raise QuickstartError("--variants chooses ablation variants: add --ablations")
        check_variants(variants)  # before the quickstart, not after its minutes
        report = run_quickstart(args.out, settings, overwrite=args.overwrite)
        if args.ablations:
            run_ablations(Path(args.out), settings, variants=variants)
    except QuickstartError as err:
        raise SystemExit(f"iadgpt quickstart: {err}") from None
    print(f"Report: {Path(args.out) / 'report.md'} ({report['minutes']:.1f} min)")
    return 0
