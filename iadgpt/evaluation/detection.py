"""The few-shot detection and localisation benchmark: plan, score once, evaluate, report.

The protocol, and why it is this one:

* **Queries** are the test images of each category. `max_queries_per_category` keeps an evenly
  spaced subset of the sorted normal and anomalous images, in proportion (at least one of each
  class when the category has it), the same for every k and seed, for quick runs.
* **References**: for every (category, k, seed), k normal images drawn without replacement from the
  category's *train* split, with numpy's generator seeded by (seed, k, crc32(category)): the same
  draw on every machine, independent between categories, and written to `OUT/manifest.json`
  (paths relative to the dataset root, in prompt order). Passing that file back (`manifest=`)
  replays exactly those references and queries. A dataset without a train split (a plain folder
  without `train/good`) draws from its *test* normals instead, and the drawn images are removed
  from that run's queries, because a reference scored against itself would inflate every metric;
  the query sets of such runs then differ slightly between seeds. k = 0 has nothing to draw, so
  it runs once (seed 0) and reports a std of 0.
* **Scoring**: one forward pass per query through `Inspector` (no text generation) gives the image
  score (p("Yes")) and the pixel map on the visual-token grid. After every batch the results are
  appended to `OUT/cache/k<k>_seed<s>.rank<r>.jsonl` (one file per process: no two writers share
  a file), flushed and fsynced, so an interrupted run loses at most the batch in flight and a
  rerun only scores what is missing. Each line carries a fingerprint of the model's files (a
  SHA-256 of its weights, config and processor, not its path: new weights written to the same
  folder are new), the dataset root, category, k, seed and the references' paths, sizes and
  modification times, plus the query file's own size and modification time: a line scored under
  other conditions is ignored, never reused. A line cut short by a kill is skipped.
* **Maps** are evaluated at a fixed resolution: the token map is upsampled bilinearly (the same
  operation `Inspector` uses to reach the query resolution) straight to a shape whose long side is
  `map_size` (256 by default, aspect ratio kept), and masks are resized to that shape with nearest
  neighbour. Pixel-metric cost grows with the pixel count, and 256 is the resolution the field
  reports at. The maps of one category and run are min-max normalised together (IADGPT
  supplement, "Inference"); rank metrics are unchanged by that, overlays and thresholds are not.
* **Metrics** (`iadgpt.evaluation.metrics`, scikit-learn underneath): image AUROC, AP, F1-max;
  pixel AUROC, AP, F1-max; AUPRO up to FPR 0.3 (the MVTec AD reference definition: 8-connected
  regions, exact curve, trapezoid up to 0.3, divided by 0.3). Per seed, each category and the mean
  over categories; over seeds, mean and sample std (ddof 1) of both.
* **Processes**: under `accelerate launch` the pending queries of each (k, seed) are split over
  ranks (`PartialState.split_between_processes`), gathered on rank 0 (`gather_object`), and rank 0
  alone evaluates and writes the reports. Every rank checks the data before scoring, so bad input
  stops all of them with the same message.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.readers import DATASET_KINDS, DatasetReader, open_dataset
from ..data.samples import DataError, Sample, load_image, load_mask, resolve_under_root
from .metrics import DEFAULT_MAX_FPR, image_metrics, normalize_per_category, pixel_metrics, summarize_over_seeds

__all__ = [
    "BenchmarkPlan",
    "CategoryPlan",
    "DetectionSettings",
    "DetectionSetupError",
    "GroundTruth",
    "MANIFEST_FORMAT",
    "ScoreCache",
    "load_ground_truth",
    "plan_benchmark",
    "run_detection",
]

MANIFEST_FORMAT = "iadgpt-detection-manifest/1"
ZERO_SHOT_SEEDS = (0,)
"""k = 0 shows no reference, so every seed would give the same numbers: it runs once."""


class DetectionSetupError(ValueError):
    """The benchmark cannot start as asked: settings, model folder, k too large, a bad manifest."""


@dataclass
class DetectionSettings:
    """What `eval/detection.py` takes on its command line."""

    model: str
    """Checkpoint folder (or hub name) of a Qwen2.5-VL / IADGPT model."""
    dataset: str
    """Layout of the dataset: one of `iadgpt.data.readers.DATASET_KINDS`."""
    root: str
    """Dataset root folder."""
    out: str
    """Output folder: manifest, cache, results, overlays, plots."""
    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    """Numbers of normal references k to evaluate."""
    seeds: int = 3
    """Few-shot draws per k > 0 (seeds 0 .. seeds-1)."""
    manifest: str | None = None
    """A manifest.json of an earlier run: replays its references and queries (shots, seeds,
    categories and max_queries_per_category are then taken from it)."""
    batch_size: int = 4
    """Queries per forward pass."""
    categories: list[str] | None = None
    """Only these categories (default: all)."""
    max_queries_per_category: int | None = None
    """Score at most this many test images per category (a class-proportional subset)."""
    map_size: int = 256
    """Long side, in pixels, at which maps and masks are compared."""
    overlays_per_category: int = 4
    """Heatmap overlays written per category (from the first seed of the largest k)."""
    min_pixels: int | None = None
    """Smallest image area after resizing (None: the model's processor's, which training saved with
    the limits it trained at)."""
    max_pixels: int | None = None
    """Largest image area after resizing; caps the visual tokens per image (None: the model's
    processor's). Cached scores are reused only under the same limits."""

    def validate(self) -> None:
        if self.dataset not in DATASET_KINDS:
            raise DetectionSetupError(f"unknown dataset kind {self.dataset!r}; allowed: {', '.join(DATASET_KINDS)}")
        if not self.shots or any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise DetectionSetupError(f"shots must be distinct numbers >= 0, got {self.shots}")
        for name, low in (("seeds", 1), ("batch_size", 1), ("map_size", 8), ("overlays_per_category", 0)):
            if getattr(self, name) < low:
                raise DetectionSetupError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_queries_per_category is not None and self.max_queries_per_category < 1:
            raise DetectionSetupError(f"max_queries_per_category must be >= 1, got {self.max_queries_per_category}")


# --------------------------------------------------------------------------------------------------
# Plan: which queries, which references


@dataclass
class CategoryPlan:
    """The queries of one category and its references for every (k, seed)."""

    name: str
    queries: list[Sample]
    reference_split: str
    """"train", or "test" for datasets without a train split (references are then not queries)."""
    references: dict[int, dict[int, list[Sample]]]
    """k -> seed -> the k normal references in prompt order."""

    def run_queries(self, k: int, seed: int) -> list[Sample]:
        """The queries scored in run (k, seed): all of them, minus its references when those come
        from the test split."""
        if self.reference_split == "train":
            return self.queries
        used = {sample.image_path for sample in self.references[k][seed]}
        return [sample for sample in self.queries if sample.image_path not in used]


@dataclass
class BenchmarkPlan:
    """Everything a run scores, fixed before the first forward pass."""

    kind: str
    root: Path
    categories: dict[str, CategoryPlan]

    def runs(self) -> list[tuple[int, int]]:
        """(k, seed) pairs in increasing k, then seed."""
        first = next(iter(self.categories.values()))
        return [(k, seed) for k in sorted(first.references) for seed in sorted(first.references[k])]

    def seeds_of(self, k: int) -> list[int]:
        return [seed for shots, seed in self.runs() if shots == k]

    def key(self, path: Path) -> str:
        """A file's name in manifests and caches: its path relative to the dataset root."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:  # outside the root (readers resolve metadata paths under it, so rarely)
            return str(path)

    def manifest(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "dataset": {"kind": self.kind, "root": str(self.root)},
            "categories": {
                name: {
                    "reference_split": plan.reference_split,
                    "queries": [self.key(sample.image_path) for sample in plan.queries],
                    "references": {
                        str(k): {str(seed): [self.key(s.image_path) for s in refs] for seed, refs in by_seed.items()}
                        for k, by_seed in plan.references.items()
                    },
                }
                for name, plan in self.categories.items()
            },
        }


def _by_path(samples) -> list[Sample]:
    """Sorted by path: the order every draw and subset starts from, so they do not depend on the
    order a reader or file system lists files in."""
    return sorted(samples, key=lambda s: str(s.image_path))


def select_queries(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` samples: evenly spaced over the sorted normals and anomalies, in proportion,
    keeping at least one of each class the category has (both are needed for AUROC)."""
    samples = _by_path(samples)
    if limit is None or len(samples) <= limit:
        return samples
    normals = [s for s in samples if not s.is_anomalous]
    anomalies = [s for s in samples if s.is_anomalous]
    take_anomalies = round(limit * len(anomalies) / len(samples))
    keep_a_normal = 1 if normals and limit > 1 else 0
    take_anomalies = min(max(take_anomalies, 1 if anomalies else 0), len(anomalies), limit - keep_a_normal)
    take_normals = min(limit - take_anomalies, len(normals))

    def spaced(items: list[Sample], count: int) -> list[Sample]:
        return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)] if count else []

    return _by_path(spaced(normals, take_normals) + spaced(anomalies, take_anomalies))


def draw_references(pool: list[Sample], k: int, seed: int, category: str) -> list[Sample]:
    """k distinct samples of `pool` (sorted by path), the same on every machine for (seed, k, category)."""
    rng = np.random.default_rng([seed, k, zlib.crc32(category.encode("utf-8"))])
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _open_reader(settings: DetectionSettings) -> DatasetReader:
    # Pixel metrics need a mask for every anomalous query: a missing one is an error naming the image.
    return open_dataset(settings.dataset, settings.root, require_masks=True)


def _category_samples(reader: DatasetReader, category: str) -> list[Sample]:
    samples = list(reader.samples(category=category))
    if not any(s.split == "test" for s in samples):
        raise DataError(f"{reader.root}: category {category!r} has no test images to score")
    return samples


def _reference_pool(samples: list[Sample]) -> tuple[list[Sample], str]:
    """The normals references are drawn from, sorted by path, and their split: train when there is one."""
    train_normals = _by_path(s for s in samples if s.split == "train" and not s.is_anomalous)
    if train_normals:
        return train_normals, "train"
    return _by_path(s for s in samples if s.split == "test" and not s.is_anomalous), "test"


def _plan_by_drawing(settings: DetectionSettings, reader: DatasetReader) -> BenchmarkPlan:
    known = reader.categories()
    wanted = settings.categories or known
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise DetectionSetupError(f"{reader.root}: no category {', '.join(map(repr, unknown))}; "
                                  f"categories: {', '.join(known)}")
    categories = {}
    for name in wanted:
        samples = _category_samples(reader, name)
        pool, split = _reference_pool(samples)
        references: dict[int, dict[int, list[Sample]]] = {}
        for k in sorted(settings.shots):
            # References drawn from the test split are not queries: one normal must be left to score.
            spare = 1 if split == "test" and k > 0 else 0
            if k + spare > len(pool):
                where = pool[0].image_path.parent if pool else reader.root / name
                besides = " and one normal query besides them" if spare else ""
                raise DetectionSetupError(
                    f"category {name!r}: {k}-shot needs {k} normal reference images{besides}, but its {split} split "
                    f"has only {len(pool)} ({where})")
            seeds = ZERO_SHOT_SEEDS if k == 0 else range(settings.seeds)
            references[k] = {seed: draw_references(pool, k, seed, name) for seed in seeds}
        queries = select_queries([s for s in samples if s.split == "test"], settings.max_queries_per_category)
        categories[name] = CategoryPlan(name, queries, split, references)
    return BenchmarkPlan(reader.kind, reader.root, categories)


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise DetectionSetupError(f"{path}: manifest file does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: malformed JSON: {error.msg}") from error
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a detection manifest (expected \"format\": \"{MANIFEST_FORMAT}\")")
    if not isinstance(document.get("categories"), dict) or not document["categories"]:
        raise DataError(f"{path}: 'categories' must map category names to their queries and references")
    return document


def _plan_from_manifest(settings: DetectionSettings, reader: DatasetReader) -> BenchmarkPlan:
    path = Path(settings.manifest)
    document = _read_manifest(path)
    kind = (document.get("dataset") or {}).get("kind")
    if kind != reader.kind:
        raise DetectionSetupError(f"{path}: manifest is for a {kind!r} dataset, not {reader.kind!r}")
    known = reader.categories()
    plan = BenchmarkPlan(reader.kind, reader.root, {})
    runs = None
    for name, entry in document["categories"].items():
        where = f"{path}: category {name!r}"
        if name not in known:
            raise DataError(f"{where} is not in the dataset at {reader.root} (categories: {', '.join(known)})")
        try:
            query_keys, split, by_k = entry["queries"], entry["reference_split"], entry["references"]
            references_keys = {int(k): {int(seed): list(keys) for seed, keys in by_seed.items()}
                               for k, by_seed in by_k.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{where}: malformed entry ({error!r}); expected queries, reference_split, "
                            "references {k: {seed: [paths]}}") from error
        if split not in ("train", "test"):
            raise DataError(f"{where}: reference_split must be 'train' or 'test', got {split!r}")
        samples = {plan.key(s.image_path): s for s in _category_samples(reader, name)}

        def lookup(key: str, what: str) -> Sample:
            try:  # normalised as the plan writes keys, and never outside the dataset root
                sample = samples.get(plan.key(resolve_under_root(reader.root, key)))
            except (DataError, TypeError) as error:
                raise DataError(f"{where}: {what} {key!r}: {error}") from error
            if sample is None:
                raise DataError(f"{where}: {what} {key!r} is not an image of this category in {reader.root}")
            return sample

        references: dict[int, dict[int, list[Sample]]] = {}
        for k, by_seed in sorted(references_keys.items()):
            references[k] = {}
            for seed, keys in sorted(by_seed.items()):
                refs = [lookup(key, "reference") for key in keys]
                if len(refs) != k or any(s.is_anomalous for s in refs):
                    raise DataError(f"{where}: {k}-shot seed {seed} must list {k} normal images, got {keys}")
                references[k][seed] = refs
        category_runs = [(k, seed) for k in references for seed in references[k]]
        if runs is not None and category_runs != runs:
            raise DataError(f"{where}: lists other (k, seed) runs than the categories before it")
        runs = category_runs
        if not runs:
            raise DataError(f"{where}: no references listed (not even an empty 0-shot list)")
        plan.categories[name] = CategoryPlan(name, [lookup(key, "query") for key in query_keys], split, references)
    return plan


def plan_benchmark(settings: DetectionSettings) -> BenchmarkPlan:
    """Open the dataset and fix every run's queries and references (drawn, or replayed from a
    manifest). Raises DataError / DetectionSetupError naming the file, category or k at fault."""
    settings.validate()
    reader = _open_reader(settings)
    return _plan_from_manifest(settings, reader) if settings.manifest else _plan_by_drawing(settings, reader)


# --------------------------------------------------------------------------------------------------
# Ground truth, read before scoring


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels: a cheap check, before hours of
    inference, that every file is an image at all (truncated data is caught when decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as error:
        raise DataError(f"{path}: image file does not exist") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from error


def evaluation_shape(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(height, width) with the long side `long_side` and the image's aspect ratio."""
    scale = long_side / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class GroundTruth:
    """Every query's size and, for anomalous queries, its mask at the evaluation resolution."""

    map_size: int
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """Image path -> (width, height) of the query image."""
    masks: dict[Path, np.ndarray] = field(default_factory=dict)
    """Image path -> bool mask at `shape(path)` (anomalous queries only; normal ones are all False)."""

    def shape(self, path: Path) -> tuple[int, int]:
        return evaluation_shape(*self.sizes[path], self.map_size)

    def mask(self, path: Path) -> np.ndarray:
        found = self.masks.get(path)
        return found if found is not None else np.zeros(self.shape(path), dtype=bool)


def load_ground_truth(plan: BenchmarkPlan, map_size: int) -> GroundTruth:
    """Read every query's size and mask, and every reference's header, now: a missing, unreadable or
    wrongly sized file stops the run before any scoring, with its name."""
    truth = GroundTruth(map_size)
    for category in plan.categories.values():
        for sample in category.queries:
            size = image_size(sample.image_path)
            truth.sizes[sample.image_path] = size
            if not sample.is_anomalous:
                continue
            if sample.mask_path is None:
                raise DataError(f"{sample.image_path}: anomalous query has no mask; pixel metrics need one")
            try:
                mask = load_mask(sample.mask_path, size)
            except DataError as error:
                raise DataError(f"{error} (mask of image {sample.image_path})") from error
            height, width = evaluation_shape(*size, map_size)
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
            truth.masks[sample.image_path] = np.asarray(resized) > 127
        for sample in {s.image_path: s for by_seed in category.references.values()
                       for refs in by_seed.values() for s in refs}.values():
            image_size(sample.image_path)
    return truth


# --------------------------------------------------------------------------------------------------
# Score cache


def file_stamp(path: Path) -> list[int]:
    """[size in bytes, modification time in ns]: an image replaced or edited in place gets another."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def run_fingerprint(model_digest: str, root: Path, category: str, k: int, seed: int,
                    references: list[tuple[str, list[int]]]) -> str:
    """What a cached score depends on besides its query file: the model's files (`model_sha256`),
    the dataset root, the run and its references (key and `file_stamp` each). A line with another
    fingerprint is not reused."""
    text = json.dumps([model_digest, str(root), category, k, seed, references])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ScoreCache:
    """Append-only JSON-lines files of per-query results, one per (k, seed) and process.

    A line: {"query": key, "category", "run": fingerprint, "file": the query's `file_stamp`, "score",
    "width", "height", "token_map": [[...]]}. The token map (the model's own grid, e.g. 18 x 18 for a 504-px query, or
    36 x 36 per vision patch with `residuals.scores`) is all the evaluation needs to rebuild the map
    at any resolution, so lines stay small and a run keeps no other state. Plain JSON: nothing executable is ever loaded back.
    """

    FIELDS = frozenset({"query", "category", "run", "file", "score", "width", "height", "token_map"})

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = rank

    def path(self, k: int, seed: int) -> Path:
        return self.folder / f"k{k}_seed{seed}.rank{self.rank}.jsonl"

    def load(self, k: int, seed: int) -> dict[str, dict]:
        """Query key -> its latest record, over the files of every process of earlier runs."""
        records: dict[str, dict] = {}
        for path in sorted(self.folder.glob(f"k{k}_seed{seed}.rank*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when a run was killed mid-write
                if isinstance(record, dict) and self.FIELDS <= record.keys():
                    record["token_map"] = np.asarray(record["token_map"], dtype=np.float32)  # 4 bytes a value, not 32
                    records[record["query"]] = record
        return records

    def append(self, k: int, seed: int, records: list[dict]) -> None:
        """Append and fsync: once this returns, the records survive a kill."""
        path = self.path(k, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records).encode("utf-8")
        with path.open("a+b") as stream:
            if stream.tell() > 0:
                stream.seek(-1, os.SEEK_END)
                if stream.read(1) != b"\n":  # finish a line cut short by a kill, keeping ours whole
                    payload = b"\n" + payload
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())


# --------------------------------------------------------------------------------------------------
# Scoring


def distributed_state():
    """accelerate's process state: gloo on CPU (else every rank thinks it is rank 0 of 1)."""
    from accelerate import PartialState

    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=use_cpu)


def load_inspector(model: str, batch_size: int, device, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model on this process's device (accelerate's: its GPU, or the CPU with ACCELERATE_USE_CPU),
    in that device's dtype (`device_and_dtype`: bf16 on a GPU, fp32 on the CPU), at these pixel limits."""
    from ..inspection import Inspector

    return Inspector.from_pretrained(model, device=device, batch_size=batch_size, min_pixels=min_pixels,
                                     max_pixels=max_pixels)


def model_digest(model: str) -> str:
    """`model_sha256` of the checkpoint folder `model`, or of its cached hub snapshot for a hub name."""
    from ..utils.digests import model_sha256

    folder = Path(model).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception as error:  # noqa: BLE001 - any failure means: no local files to digest
            raise DetectionSetupError(f"model {model}: no local copy of its files to fingerprint the score "
                                      f"cache with ({error})") from error
    return model_sha256(folder)


def check_model(model: str) -> str:
    """Fail now, naming the folder, if `model` is not a Qwen2.5-VL checkpoint; return its identity."""
    from ..model.checkpoint import check_checkpoint

    try:
        check_checkpoint(model)
    except (FileNotFoundError, ValueError) as error:
        raise DetectionSetupError(str(error)) from error
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model


def evaluation_pixel_limits(settings: DetectionSettings) -> tuple[int, int]:
    """(min_pixels, max_pixels) the queries are scored at: the settings' over the model processor's."""
    from ..model.checkpoint import load_processor, pixel_limits

    try:
        return pixel_limits(load_processor(settings.model, min_pixels=settings.min_pixels,
                                           max_pixels=settings.max_pixels))
    except ValueError as error:
        raise DetectionSetupError(str(error)) from error


def score_run(plan: BenchmarkPlan, k: int, seed: int, inspector, cache: ScoreCache, cached: dict[str, dict],
              truth: GroundTruth, weights: str, batch_size: int, state, say: Callable[[str], None]) -> dict[str, dict]:
    """Score the queries of run (k, seed) that the cache does not hold (for these `weights`, a
    `model_digest`), split over the processes.

    Returns, on the main process, query key -> record for every query of the run; on other
    processes an empty dict.
    """
    from accelerate.utils import gather_object

    started = time.monotonic()
    valid, pending = {}, []
    for category in plan.categories.values():
        references = [(plan.key(s.image_path), file_stamp(s.image_path)) for s in category.references[k][seed]]
        fingerprint = run_fingerprint(weights, plan.root.resolve(), category.name, k, seed, references)
        for sample in category.run_queries(k, seed):
            key = plan.key(sample.image_path)
            record = cached.get(key)
            width, height = truth.sizes[sample.image_path]
            stamp = file_stamp(sample.image_path)
            if (record and record["run"] == fingerprint and record["file"] == stamp
                    and (record["width"], record["height"]) == (width, height)):
                valid[key] = record
            else:
                pending.append((category.name, sample, fingerprint, stamp))
    scored = []
    with state.split_between_processes(pending) as mine:
        for name, group in itertools.groupby(mine, key=lambda item: item[0]):
            group = list(group)
            references = [load_image(s.image_path) for s in plan.categories[name].references[k][seed]]
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                queries = [load_image(sample.image_path) for _, sample, _, _ in batch]
                results = inspector.inspect(queries, [references] * len(batch))
                records = [
                    {"query": plan.key(sample.image_path), "category": name, "run": fingerprint, "file": stamp,
                     "score": float(result.score), "width": image.width, "height": image.height,
                     "token_map": np.asarray(result.token_map, dtype=np.float32).tolist()}
                    for (_, sample, fingerprint, stamp), image, result in zip(batch, queries, results, strict=True)
                ]
                cache.append(k, seed, records)
                scored.extend(records)
    gathered = gather_object(scored)
    say(f"{k}-shot seed {seed}: {len(pending)} queries scored, {len(valid)} from the cache, "
        f"{time.monotonic() - started:.1f} s")
    if not state.is_main_process:
        return {}
    valid.update((record["query"], record) for record in gathered)
    return valid


# --------------------------------------------------------------------------------------------------
# Evaluation


def upsample_token_map(token_map, shape: tuple[int, int]) -> np.ndarray:
    """The token-grid map resized bilinearly to (height, width), as `Inspector` resizes it."""
    grid = torch.as_tensor(np.asarray(token_map, dtype=np.float32))[None, None]
    return F.interpolate(grid, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class CategoryEvaluation:
    """One category in one run: its metrics, and what the plots and overlays draw."""

    metrics: dict[str, float]
    queries: list[Sample]
    labels: np.ndarray
    scores: np.ndarray
    masks: list[np.ndarray]
    maps: list[np.ndarray]
    """Normalised with the category's joint minimum and maximum (supplement, "Inference")."""


def evaluate_category(queries: list[Sample], records: dict[str, dict], plan: BenchmarkPlan,
                      truth: GroundTruth) -> CategoryEvaluation:
    try:
        chosen = [records[plan.key(sample.image_path)] for sample in queries]
    except KeyError as error:
        raise RuntimeError(f"no score for query {error}: scoring did not finish") from error
    labels = np.array([sample.is_anomalous for sample in queries], dtype=np.int64)
    scores = np.array([record["score"] for record in chosen], dtype=np.float64)
    masks = [truth.mask(sample.image_path) for sample in queries]
    maps = normalize_per_category([upsample_token_map(record["token_map"], mask.shape)
                                   for record, mask in zip(chosen, masks)])
    metrics = {**image_metrics(labels, scores), **pixel_metrics(masks, maps, max_fpr=DEFAULT_MAX_FPR)}
    return CategoryEvaluation(metrics, queries, labels, scores, masks, maps)


def mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over categories (NaN in, NaN out, as everywhere in metrics.py)."""
    names = next(iter(per_category.values())).keys()
    return {name: float(np.mean([metrics[name] for metrics in per_category.values()])) for name in names}


def summarize_results(per_seed: dict[int, dict[int, dict[str, dict[str, float]]]]) -> dict:
    """{"k": {"<k>": {"categories": {cat: M}, "mean": M}}}, M = {metric: {"mean", "std"}} over seeds.

    "mean" summarises the per-seed means over categories. k = 0 runs once and is deterministic,
    so its std is 0; any other k run with one seed has an undefined (NaN) sample std.
    """
    document: dict = {"k": {}}
    for k, by_seed in sorted(per_seed.items()):
        ddof = 0 if k == 0 else 1
        runs = [by_seed[seed] for seed in sorted(by_seed)]
        categories = {name: summarize_over_seeds([run[name] for run in runs], ddof=ddof) for name in runs[0]}
        document["k"][str(k)] = {
            "categories": categories,
            "mean": summarize_over_seeds([mean_over_categories(run) for run in runs], ddof=ddof),
        }
    return document


# --------------------------------------------------------------------------------------------------
# The whole run


def protocol_note(plan: BenchmarkPlan, settings: DetectionSettings, pixels: tuple[int, int]) -> str:
    """The "Protocol" section of results.md: how this run drew its references, at what resolution it
    scored and compared maps, how maps were normalised and what AUPRO is, so a reader can tell
    whether its numbers compare with a published table."""
    from_test = sorted(name for name, category in plan.categories.items() if category.reference_split == "test")
    if settings.manifest:
        draw = f"replayed from the manifest {settings.manifest} (its references, queries, shots and seeds)"
    else:
        draw = ("for every category, k and seed, k normal images drawn without replacement from the category's "
                "train split (sorted by path; numpy `default_rng([seed, k, crc32(category)])`)")
    lines = [
        "## Protocol", "",
        f"- **References**: {draw}; listed in prompt order in `manifest.json`. k = 0 runs once (seed 0)."
        + (f" Categories without a train split draw from their test normals, which then leave that run's "
           f"queries: {', '.join(from_test)}." if from_test else ""),
        f"- **Resolution**: every image resized by the processor to between {pixels[0]} and {pixels[1]} pixels "
        f"(multiples of 28 px); the query's token map is upsampled bilinearly to {settings.map_size} px on the long "
        "side (aspect ratio kept) and the masks resized to that shape with nearest neighbour.",
        "- **Image score**: p(\"Yes\") of the detection question, one forward pass per query, no generation.",
        "- **Map normalisation**: the maps of one category and run are min-max normalised together (one minimum "
        "and one maximum over all their pixels; IADGPT supplement, \"Inference\").",
        f"- **AUPRO**: MVTec AD reference definition: defect regions are the 8-connected components of each mask "
        "(3x3 structure), PRO is the overlap of each region averaged over all regions of the category, on the "
        "exact curve (every distinct score is a threshold), FPR over all normal pixels (defect-free images included), "
        f"integrated with the trapezoid rule from 0 to FPR {DEFAULT_MAX_FPR} (PRO interpolated there) and divided by "
        f"{DEFAULT_MAX_FPR}.",
        "- **Over seeds**: mean and sample standard deviation (ddof 1) of each category's metrics and of their mean "
        "over categories.",
    ]
    return "\n".join(lines) + "\n"


def run_detection(settings: DetectionSettings, inspector=None) -> dict | None:
    """Plan, score (resuming from the cache), evaluate and write every report under `settings.out`.

    `inspector` replaces the model loaded from `settings.model` (tests count forward passes with
    it). Returns the results document on the main process, None on the others.
    """
    from . import reports

    settings.validate()
    state = distributed_state()
    say = (lambda text: print(f"[detection] {text}", flush=True)) if state.is_main_process else (lambda text: None)
    out = Path(settings.out)

    # 1. Everything that can be wrong with the input fails here, before the model is loaded.
    model_id = check_model(settings.model)
    pixels = evaluation_pixel_limits(settings)
    plan = plan_benchmark(settings)
    truth = load_ground_truth(plan, settings.map_size)
    if settings.manifest:
        say(f"replaying {settings.manifest}: its shots, seeds, categories and queries are used")
    cache = ScoreCache(out / "cache", state.process_index)
    cached = {run: cache.load(*run) for run in plan.runs()}  # every rank reads before any rank writes
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        reports.write_json(out / "manifest.json", plan.manifest())
    state.wait_for_everyone()

    # 2. One forward pass per query not yet in the cache.
    started = time.monotonic()
    inspector = inspector or load_inspector(settings.model, settings.batch_size, state.device, *pixels)
    from accelerate.utils import broadcast_object_list

    # the model's files, not its path, key the cache; hashed once (a 7B model is ~15 GB), shared by all ranks
    weights = broadcast_object_list([model_digest(settings.model) if state.is_main_process else None])[0]
    say(f"{len(plan.categories)} categories, runs (k, seed): {plan.runs()}, {state.num_processes} process(es), "
        f"images resized to {pixels[0]} .. {pixels[1]} pixels")
    scored_by = json.dumps([weights, {"min_pixels": pixels[0], "max_pixels": pixels[1]}])  # what the cache keys on
    records = {run: score_run(plan, *run, inspector, cache, cached[run], truth, scored_by, settings.batch_size,
                              state, say) for run in plan.runs()}
    scoring_seconds = time.monotonic() - started
    if not state.is_main_process:
        return None

    # 3. Metrics per category, run and k; curves and overlays from each k's first seed.
    started = time.monotonic()
    per_seed: dict[int, dict[int, dict[str, dict[str, float]]]] = {}
    largest_k = max(k for k, _ in plan.runs())
    for k, seed in plan.runs():
        first_seed = seed == plan.seeds_of(k)[0]
        curves = {}
        for category in plan.categories.values():
            evaluation = evaluate_category(category.run_queries(k, seed), records[(k, seed)], plan, truth)
            per_seed.setdefault(k, {}).setdefault(seed, {})[category.name] = evaluation.metrics
            if first_seed:
                curves[category.name] = evaluation
            if first_seed and k == largest_k:
                reports.write_overlays(out / "overlays" / category.name, evaluation, f"k{k}_seed{seed}",
                                       settings.overlays_per_category, plan.key)
        if curves:
            reports.write_curves(out / "plots", k, seed, curves)
    results = summarize_results(per_seed)

    # 4. Reports.
    reports.write_json(out / "results.json", results)
    reports.write_json(out / "results_per_seed.json",
                       {str(k): {str(seed): by_category for seed, by_category in by_seed.items()}
                        for k, by_seed in per_seed.items()})
    reports.write_csv(out / "results.csv", results)
    reports.write_text(out / "results.md", reports.markdown_tables(results, title=f"{plan.kind}: {plan.root.name}")
                       + "\n" + protocol_note(plan, settings, pixels))
    queries = sum(len(c.run_queries(*run)) for run in plan.runs() for c in plan.categories.values())
    reports.write_json(out / "run_info.json", {
        "model": model_id, "model_sha256": weights, "dataset": {"kind": plan.kind, "root": str(plan.root)}, "runs": plan.runs(),
        "categories": list(plan.categories), "processes": state.num_processes, "queries_scored_or_cached": queries,
        "map_size": settings.map_size, "min_pixels": pixels[0], "max_pixels": pixels[1],
        "max_fpr": DEFAULT_MAX_FPR, "scoring_seconds": round(scoring_seconds, 2),
        "evaluation_seconds": round(time.monotonic() - started, 2)})
    say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results
