"""The quickstart's settings, its output folder and the state that makes a rerun resume."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    iadgpt: dict = field(default_factory=lambda: {
        "score_loss_weight": 1.0,
        "residuals": {"tokens": True, "scores": True, "shifted_exemplars": True, "shifted_query": True,
                      "map_attention": False, "image_score_map_weight": 0.75}})
    """IADGPT setting overrides for every stage. Default: every beyond-the-paper setting of the
    `residuals` group (the in-context residuals, their evidence in the scores, half-patch-shifted
    exemplars in their patch bank, a map drawn from the evidence alone on a half-patch lattice wherever
    there are exemplars, and the image score fused with the map's maximum at inference) with the
    Yes/No score loss. docs/model.md has what each of them changed. {} trains the paper's model."""
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
