"""Stage builders: datasets on disk in, training records (JSONL shards) out.

Each builder is a generator of `TrainingRecord`s written by `ShardWriter`, so memory stays flat
as the data grows (only image *paths* are indexed, images are opened one record at a time), a
crashed build resumes at its last finished shard, and every record is drawn from a generator
seeded by (seed, stage, record index): the same seed gives the same records.

Leakage: images of a declared benchmark test split (`benchmark_test`) are removed from every pool
before drawing and checked again on every record written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..model.checkpoint import add_pixel_limit_arguments
from ..model.settings import DetectionQuestion
from . import tasks
from .readers import open_dataset
from .records import ShardWriter, StageInfo, TrainingRecord, read_records
from .samples import DataError, Sample, load_image, load_mask, load_sample
from .synthesis import cutpaste_patch, cutpaste_scar, foreground_mask, perlin_blend


@dataclass(frozen=True)
class DatasetSource:
    """A dataset on disk: `name=kind:root` on the command line (name defaults to the folder name)."""

    name: str
    kind: str
    root: Path

    @classmethod
    def parse(cls, text: str) -> "DatasetSource":
        name, _, rest = text.rpartition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
        kind, sep, root = rest.partition(":")
        if not sep or not kind or not root:
            raise ValueError(f"dataset {text!r} is not of the form [name=]kind:root, e.g. mvtec:/data/mvtec_ad")
        root_path = Path(root).expanduser().resolve()
        return cls(name=name or root_path.name, kind=kind, root=root_path)

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))


@dataclass
class CategoryPool:
    """The images of one category, by role: exemplar normals and queries (normal / anomalous)."""

    source: DatasetSource
    category: str
    train_normals: list[Sample] = field(default_factory=list)
    test_normals: list[Sample] = field(default_factory=list)
    anomalies: list[Sample] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.source.name}/{self.category}"


SKIP_UNREADABLE = "unreadable image or mask"
"""The skip reason of a sample whose image or mask does not decode (or whose mask has another size)."""


def index_sources(sources: Sequence[DatasetSource], benchmark_test: set[Path] = frozenset(),
                  categories: set[str] | None = None, skip_bad: bool = False) -> list[CategoryPool]:
    """Index every source by category, leaving out the benchmark's test images.

    Every indexed image (and mask) is decoded once here (`decode_errors`), so a corrupt or truncated
    file stops the build naming it, instead of surfacing as a DataLoader traceback mid-training.
    With `skip_bad`, samples that cannot be used (a missing mask, a listed file that is gone, an
    undecodable image, ...) are left out and counted on stdout instead of stopping the build.
    """
    pools: dict[tuple[str, str], CategoryPool] = {}
    for source in sources:
        reader = open_dataset(source.kind, source.root, skip_bad=skip_bad)
        wanted = [sample for sample in reader.samples()
                  if (categories is None or sample.category in categories)
                  and Path(sample.image_path).resolve() not in benchmark_test
                  and (not sample.is_anomalous or sample.mask_path is not None)]
        for sample, error in zip(wanted, decode_errors(wanted)):
            if error is not None:
                if not skip_bad:
                    raise DataError(f"{error} (--skip-bad leaves such samples out)")
                reader.skipped[SKIP_UNREADABLE] += 1
                continue
            pool = pools.setdefault((source.name, sample.category), CategoryPool(source, sample.category))
            if not sample.is_anomalous:
                (pool.train_normals if sample.split == "train" else pool.test_normals).append(sample)
            else:
                pool.anomalies.append(sample)
        if reader.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(reader.skipped.items()))
            print(f"{source.name}: skipped {sum(reader.skipped.values())} bad samples ({reasons})")
    if not pools:
        raise DataError(f"no images found in {[str(s.root) for s in sources]}")
    return [pools[key] for key in sorted(pools)]


def decode_errors(samples: Sequence[Sample]) -> list[DataError | None]:
    """Per sample, the DataError (naming the file) of decoding its image and mask, or None.
    Threads: Pillow releases the GIL while it inflates and decodes."""
    from concurrent.futures import ThreadPoolExecutor

    def error_of(sample: Sample) -> DataError | None:
        try:
            load_sample(sample).image.close()
        except DataError as error:
            return error
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(error_of, samples))


def benchmark_test_images(sources: Sequence[DatasetSource]) -> set[Path]:
    """All test-split images of the declared benchmark datasets (resolved paths)."""
    images = set()
    for source in sources:
        for sample in open_dataset(source.kind, source.root).samples(split="test"):
            images.add(Path(sample.image_path).resolve())
    return images


def record_rng(seed: int, stage: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, index])


def pick(rng: np.random.Generator, items: Sequence, count: int = 1, exclude: Sample | None = None) -> list:
    candidates = [item for item in items if item is not exclude]
    if len(candidates) < count:
        raise DataError(f"need {count} images but only {len(candidates)} are available")
    return [candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)]


class LeakGuard:
    """Refuses any record that names a benchmark test image (a second line of defence)."""

    def __init__(self, benchmark_test: set[Path], info: StageInfo):
        self.benchmark_test, self.info = benchmark_test, info

    def check(self, record: TrainingRecord) -> TrainingRecord:
        if self.benchmark_test:
            for path in record.images:
                if self.info.image_path(record, path).resolve() in self.benchmark_test:
                    raise DataError(f"record {record.id} uses benchmark test image {path}: refusing to leak it")
        return record


# -- stage 1: captions ---------------------------------------------------------------------------
def caption_lines(captions_file: Path) -> Iterator[tuple[int, dict]]:
    with Path(captions_file).open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{captions_file}:{line_number}: malformed JSON ({err.msg})") from err
            if not isinstance(item, dict) or not item.get("image") or not item.get("caption"):
                raise DataError(f"{captions_file}:{line_number}: needs 'image' and 'caption'")
            yield line_number, item


def stage1_records(caption_files: Sequence[tuple[str, Path]], seed: int,
                   benchmark_test: set[Path] = frozenset(), roots: dict[str, str] | None = None
                   ) -> Iterator[TrainingRecord]:
    """One caption record per (image, caption) line; `caption_files` are (root name, captions.jsonl)."""
    index = 0
    for root_name, captions_file in caption_files:
        root = Path(roots[root_name]) if roots else Path(captions_file).parent
        for line_number, item in caption_lines(captions_file):
            if (root / item["image"]).resolve() in benchmark_test:
                continue
            rng = record_rng(seed, 1, index)
            question = tasks.CAPTION_QUESTIONS[int(rng.integers(len(tasks.CAPTION_QUESTIONS)))]
            yield TrainingRecord(
                id=f"s1-{index:08d}", task="caption", root=root_name, images=[item["image"]], image_roles=["other"],
                messages=tasks.caption_messages(question, item["caption"]), source=f"{captions_file}:{line_number}")
            index += 1


# -- stage 2: discrepancy awareness --------------------------------------------------------------
SYNTHETIC_KINDS = ("cutpaste", "scar", "texture_blend")


@dataclass
class Stage2Options:
    """How many of each discrepancy task, and how defects are made."""

    records: int = 1000
    """Records to draw (tasks in turn: odd one out, difference regions, irregular region)."""
    group_size: int = 4
    """Images per odd-one-out group."""
    synthetic_fraction: float = 0.5
    """Share of defects made by synthesis (CutPaste / scar / Perlin blend) from normals; the rest
    are real anomalies with masks, where a category has them."""
    negative_fraction: float = 0.25
    """Share of difference / irregular-region records with nothing to find."""
    resize: tasks.ResizeRule = field(default_factory=tasks.ResizeRule)
    """The target processor's resizing, for box coordinates."""


class SyntheticDefects:
    """Makes a defect on a normal image and stores image + mask under the stage folder."""

    def __init__(self, folder: Path, pools: list[CategoryPool]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.texture_pool = [s for pool in pools for s in pool.train_normals[:4]]

    def make(self, name: str, normal: Sample, rng: np.random.Generator) -> tuple[str, str, str]:
        """(image path, mask path, kind), relative to the synthetic root; reused when already on disk.

        The kind is drawn first; when it leaves no visible change (a patch pasted onto a uniform
        texture it matches), the other kinds are tried in turn.
        """
        first = int(rng.integers(len(SYNTHETIC_KINDS)))
        image_rel, mask_rel = f"{name}.png", f"{name}_mask.png"
        kind_file = self.folder / f"{name}.kind"
        if (self.folder / image_rel).is_file() and kind_file.is_file():
            return image_rel, mask_rel, kind_file.read_text()  # a resumed build: made before the crash
        image = load_image(normal.image_path)
        foreign = [s for s in self.texture_pool if s.category != normal.category] or self.texture_pool
        for attempt in range(3 * len(SYNTHETIC_KINDS)):
            kind = SYNTHETIC_KINDS[(first + attempt // 3) % len(SYNTHETIC_KINDS)]
            if kind == "cutpaste":
                result, mask = cutpaste_patch(image, rng)
            elif kind == "scar":
                result, mask = cutpaste_scar(image, rng)
            else:
                texture = load_image(foreign[int(rng.integers(len(foreign)))].image_path).resize(image.size)
                result, mask = perlin_blend(image, texture, rng, foreground=foreground_mask(image))
            if mask.any():
                break
        else:
            raise DataError(f"could not synthesise a visible defect on {normal.image_path}")
        tmp = self.folder / (image_rel + ".tmp.png")
        result.save(tmp)
        Image.fromarray(mask.astype(np.uint8) * 255).save(self.folder / mask_rel)
        kind_file.write_text(kind)
        os.replace(tmp, self.folder / image_rel)  # the commit point: image, mask and kind are all there
        return image_rel, mask_rel, kind


def _defect(pool: CategoryPool, synth: SyntheticDefects, rng: np.random.Generator, name: str,
            options: Stage2Options, base: Sample | None = None):
    """(root, image, mask, defect type): a real anomaly or a synthetic one made from a normal."""
    if base is None and pool.anomalies and rng.random() >= options.synthetic_fraction:
        real = pick(rng, pool.anomalies)[0]
        return pool.source.name, pool.source.relative(real.image_path), pool.source.relative(real.mask_path), real.defect_type
    base = base or pick(rng, pool.train_normals)[0]
    image, mask, kind = synth.make(name, base, rng)
    return "synthetic", image, mask, kind


def stage2_records(pools: list[CategoryPool], synth: SyntheticDefects, options: Stage2Options, seed: int
                   ) -> Iterator[TrainingRecord]:
    usable = [p for p in pools if len(p.train_normals) >= options.group_size]
    if not usable:
        raise DataError(f"stage 2 needs categories with at least {options.group_size} normal training images")
    for index in range(options.records):
        rng = record_rng(seed, 2, index)
        pool = usable[int(rng.integers(len(usable)))]
        src = pool.source
        task = ("odd_one_out", "difference_regions", "irregular_region")[index % 3]
        rid = f"s2-{index:08d}"
        if task == "odd_one_out":
            normals = pick(rng, pool.train_normals, options.group_size - 1)
            root, image, mask, kind = _defect(pool, synth, rng, rid, options)
            odd = int(rng.integers(options.group_size))
            images = [(src.name, src.relative(n.image_path)) for n in normals]
            images.insert(odd, (root, image))
            yield _multi_root_record(rid, task, images, ["other"] * options.group_size,
                                     tasks.odd_one_out_messages(options.group_size, odd, kind), pool, kind)
        elif task == "difference_regions":
            first = pick(rng, pool.train_normals)[0]
            if rng.random() < options.negative_fraction:
                images, boxes, kind = [(src.name, src.relative(first.image_path))] * 2, [], "none"
            else:
                _, image, mask, kind = _defect(pool, synth, rng, rid, options, base=first)
                boxes = _boxes("synthetic", image, mask, synth.folder, kind, options)
                images = [(src.name, src.relative(first.image_path)), ("synthetic", image)]
            yield _multi_root_record(rid, task, images, ["other", "other"], tasks.difference_messages(boxes), pool, kind)
        else:
            if rng.random() < options.negative_fraction:
                normal = pick(rng, pool.train_normals)[0]
                images, boxes, kind = [(src.name, src.relative(normal.image_path))], [], "none"
            else:
                root, image, mask, kind = _defect(pool, synth, rng, rid, options)
                folder = synth.folder if root == "synthetic" else src.root
                boxes = _boxes(root, image, mask, folder, kind, options)
                images = [(root, image)]
            yield _multi_root_record(rid, task, images, ["other"], tasks.irregular_region_messages(boxes), pool, kind)


def _boxes(root: str, image: str, mask: str, folder: Path, kind: str, options: Stage2Options) -> list[dict]:
    with Image.open(folder / image) as im:
        size = im.size
    return tasks.mask_boxes(load_mask(folder / mask, size), options.resize, tasks.readable(kind))


def _multi_root_record(rid, task, images, roles, messages, pool, kind) -> TrainingRecord:
    """Records name one root; images from the synthetic folder are reached through it by '../'."""
    roots = {root for root, _ in images}
    if len(roots) == 1:
        root = roots.pop()
        paths = [path for _, path in images]
    else:  # a source image next to a synthetic one: address both from the synthetic root's parent
        root = "stage"
        paths = [f"{'synthetic' if r == 'synthetic' else 'sources/' + r}/{p}" for r, p in images]
    return TrainingRecord(id=rid, task=task, root=root, images=paths, image_roles=roles, messages=messages,
                          category=pool.category, source=pool.key, meta={"defect": kind})


# -- stage 3: few-shot detection, localization, reasoning ----------------------------------------
@dataclass
class Stage3Options:
    records: int = 1000
    """Records to draw."""
    shots: tuple[int, ...] = (1, 2, 4)
    """Numbers of normal exemplars, used in turn (paper: 1, 2, 4)."""
    anomalous_fraction: float = 0.5
    """Share of defective queries."""
    localization_fraction: float = 0.25
    """Share of defective queries asked "where" instead of "whether"."""
    reasoning_fraction: float = 0.15
    """Share of defective queries asked to describe the defect (answered with its caption)."""
    abnormal_references: int = 0
    """Defective examples of the same product shown after the normals (NAGL-style); 0: none."""
    synthetic_fraction: float = 0.0
    """Share of defective queries made from a normal image by synthesis (CutPaste / scar / texture
    blend, with its mask), as stage 2 makes them. A product without real anomalies then gets
    synthetic defective queries only, so a folder of normal images alone makes stage-3 records.
    0 (the paper): real anomalies only."""
    question: DetectionQuestion = field(default_factory=DetectionQuestion)
    """The detection question (the model's, so training matches inference)."""
    resize: tasks.ResizeRule = field(default_factory=tasks.ResizeRule)
    """The target processor's resizing, for box coordinates."""


def stage3_records(pools: list[CategoryPool], options: Stage3Options, seed: int,
                   captions: dict[Path, str] | None = None,
                   synth: SyntheticDefects | None = None) -> Iterator[TrainingRecord]:
    """Few-shot records. With `options.synthetic_fraction` > 0, `synth` makes the synthetic
    defective queries; their records name the root 'stage' (`stage_roots`), which reaches both the
    source's normals and the synthetic folder."""
    if not 0.0 <= options.synthetic_fraction <= 1.0:
        raise ValueError(f"synthetic fraction {options.synthetic_fraction} is outside [0, 1]")
    synthesise = options.synthetic_fraction > 0
    if synthesise and synth is None:
        raise ValueError("a synthetic fraction above 0 needs a SyntheticDefects folder to write the defects to")
    need = max(options.shots) + 1
    usable = [p for p in pools if len(p.train_normals) + len(p.test_normals) >= need and (p.anomalies or synthesise)]
    if not usable:
        raise DataError(f"stage 3 needs categories with at least {need} normal images and some anomalies with masks"
                        + ("" if synthesise else " (or --synthetic-fraction above 0 to make defects from normals)"))
    captions = captions or {}
    for index in range(options.records):
        rng = record_rng(seed, 3, index)
        pool = usable[int(rng.integers(len(usable)))]
        src = pool.source
        shots = options.shots[index % len(options.shots)]
        defective = rng.random() < options.anomalous_fraction
        # drawn only when there is a choice, so records without synthesis stay those of earlier releases
        synthetic = defective and synthesise and (not pool.anomalies or rng.random() < options.synthetic_fraction)
        normals_pool = pool.train_normals + pool.test_normals
        query = pick(rng, pool.anomalies)[0] if defective and not synthetic else pick(rng, normals_pool)[0]
        # train normals when there are k besides the query, else the whole normal pool
        train_choices = sum(1 for s in pool.train_normals if s is not query)
        exemplars = pick(rng, pool.train_normals if train_choices >= shots else normals_pool, shots, exclude=query)
        abnormal = [a for a in pool.anomalies if a is not query][: options.abnormal_references]
        rid = f"s3-{index:08d}"
        root, images = src.name, [src.relative(s.image_path) for s in [*exemplars, *abnormal, query]]
        if synthetic:  # the query becomes a defect made on that normal
            image_rel, mask_rel, kind = synth.make(rid, query, rng)
            root = "stage"
            images = [f"sources/{src.name}/{path}" for path in images[:-1]] + [f"synthetic/{image_rel}"]
            mask, mask_file, image_file = f"synthetic/{mask_rel}", synth.folder / mask_rel, synth.folder / image_rel
        elif defective:
            kind, mask, mask_file, image_file = (query.defect_type, src.relative(query.mask_path), query.mask_path,
                                                 query.image_path)
        else:
            kind, mask = query.defect_type, None
        roles = ["exemplar"] * shots + ["other"] * len(abnormal) + ["query"]
        task = "detection"
        roll = rng.random()
        if defective and roll < options.localization_fraction and not abnormal:
            task = "localization"
            with Image.open(image_file) as im:
                size = im.size
            boxes = tasks.mask_boxes(load_mask(mask_file, size), options.resize, tasks.readable(kind))
            messages = tasks.localization_messages(shots, boxes)
        elif defective and roll < options.localization_fraction + options.reasoning_fraction and not abnormal \
                and not synthetic and Path(query.image_path).resolve() in captions:
            task = "reasoning"
            messages = tasks.reasoning_messages(shots, captions[Path(query.image_path).resolve()])
        else:
            messages = tasks.detection_messages(shots, defective, kind, options.question, len(abnormal))
        yield TrainingRecord(
            id=rid, task=task, root=root, images=images, image_roles=roles, messages=messages,
            mask=mask if task != "reasoning" else None,
            label=int(defective), category=pool.category, source=pool.key,
            meta={"defect": kind, "shots": shots,
                  **({"synthetic_from": f"sources/{src.name}/{src.relative(query.image_path)}"} if synthetic else {})})


def instruction_records(conversations: Iterable, image_root: Path, pools: list[CategoryPool],
                        shots: Sequence[int], seed: int, root_name: str = "instructions") -> Iterator[TrainingRecord]:
    """Reasoning records from LLaVA-style instruction data (e.g. Anomaly-Instruct-125k).

    A single-image conversation whose image file lies under one of the `--dataset` roots belongs to
    that dataset's category: it becomes few-shot, with k normal references of the category shown
    before it (as in the paper, which turned Anomaly-Instruct few-shot where same-category images
    existed). Others stay zero-shot (web images have no references). Later turns are text only.
    """
    owner = {Path(s.image_path).resolve(): pool for pool in pools
             for s in [*pool.train_normals, *pool.test_normals, *pool.anomalies]}
    image_root = Path(image_root).resolve()
    for index, conversation in enumerate(conversations):
        rng = record_rng(seed, 30, index)
        question = conversation.turns[0].text.replace("<image>", "").strip()
        later = [tasks.user(tasks.text(t.text)) if t.role == "human" else tasks.assistant(t.text)
                 for t in conversation.turns[2:]]
        images = [Path(p).resolve() for p in conversation.images]
        pool = owner.get(images[0]) if len(images) == 1 else None
        k = shots[index % len(shots)] if shots else 0
        normals = [n for n in ((pool.train_normals or pool.test_normals) if pool else [])
                   if Path(n.image_path).resolve() != images[0]]
        if pool is not None and k and len(normals) >= k:
            exemplars = pick(rng, normals, k)
            messages = tasks.few_shot_messages(k, question)
            paths = [pool.source.relative(n.image_path) for n in exemplars] + [pool.source.relative(images[0])]
            roles, root, category = ["exemplar"] * k + ["query"], pool.source.name, pool.category
        else:
            messages = [tasks.user(*[tasks.IMAGE] * len(images), tasks.text(question))]
            paths = [p.relative_to(image_root).as_posix() for p in images]
            roles, root, category = ["query"] if len(images) == 1 else ["other"] * len(images), root_name, None
        messages.append(tasks.assistant(conversation.turns[1].text))
        yield TrainingRecord(id=f"s3i-{index:08d}", task="reasoning", root=root, images=paths, image_roles=roles,
                             messages=messages + later, category=category, source=conversation.source,
                             meta={"instruction_id": conversation.record_id})


def load_captions(sources: Sequence[DatasetSource]) -> dict[Path, str]:
    """Captions of the sources that ship a captions.jsonl (the synthetic factory does)."""
    captions = {}
    for source in sources:
        path = source.root / "captions.jsonl"
        if path.is_file():
            for _, item in caption_lines(path):
                captions[(source.root / item["image"]).resolve()] = item["caption"]
    return captions


# -- replay and writing --------------------------------------------------------------------------
def replayed(folder: Path, ratio: float, seed: int) -> tuple[dict[str, str], Iterator[TrainingRecord]]:
    """A deterministic `ratio` share of an earlier stage's records (chosen by hashing their ids)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"replay ratio {ratio} is outside [0, 1]")
    info = StageInfo.read(folder)

    def chosen() -> Iterator[TrainingRecord]:
        for record in read_records(folder):
            digest = hashlib.sha256(f"{seed}:{record.id}".encode()).digest()
            if int.from_bytes(digest[:8], "big") / 2**64 < ratio:
                record.id = f"replay-{record.id}"
                record.root = f"replay{info.stage}-{record.root}"
                yield record

    return {f"replay{info.stage}-{k}": v for k, v in info.roots.items()}, chosen()


def write_stage(out: Path, stage: int, roots: dict[str, str], records: Iterable[TrainingRecord],
                benchmark_test: set[Path] = frozenset(), records_per_shard: int = 1000, resume: bool = True,
                config: dict | None = None, progress_total: int | None = None,
                pixels: tasks.ResizeRule | None = None) -> StageInfo:
    """Write the records into `out`; `pixels` is the resize their box coordinates are in (recorded
    in info.json, for training to check against its processor)."""
    from tqdm.auto import tqdm

    # Absolute roots: the stage folder is read from wherever training is launched.
    info = StageInfo(stage=stage, roots={k: str(Path(v).resolve()) for k, v in roots.items()}, config=config or {},
                     pixels=asdict(pixels) if pixels else None)
    writer = ShardWriter(out, info, records_per_shard=records_per_shard, resume=resume)
    guard = LeakGuard(set(benchmark_test), info)
    writer.write(guard.check(r) for r in tqdm(records, total=progress_total, desc=f"stage {stage} records",
                                               mininterval=1.0))
    return writer.close()


def stage_roots(out: Path, sources: Sequence[DatasetSource]) -> dict[str, str]:
    """Roots of a stage folder with synthetic defects (stage 2; stage 3 with a synthetic fraction): each
    source, its synthetic defects, and 'stage' for mixed records.

    Mixed records (a source image beside a synthetic one) address both from `<out>`: the synthetic
    folder is `<out>/synthetic` and each source is linked as `<out>/sources/<name>`.
    """
    links = Path(out) / "sources"
    links.mkdir(parents=True, exist_ok=True)
    for source in sources:
        link = links / source.name
        if not link.exists():
            link.symlink_to(source.root, target_is_directory=True)
    roots = {s.name: str(s.root) for s in sources}
    roots.update(synthetic=str(Path(out) / "synthetic"), stage=str(Path(out)))
    return roots


# -- what the stage-2 and stage-3 recipes share --------------------------------------------------
def run_builder(build: Callable[[list[str] | None], None], name: str, argv: list[str] | None = None) -> None:
    """Run a builder recipe's `build(argv)`. Bad input (DataError, ValueError) ends it with one line that
    starts with the recipe's `name`, without a traceback; the shards already written stay, and a rerun
    resumes after them."""
    try:
        build(argv)
    except (DataError, ValueError) as err:
        sys.exit(f"{name}: {err}")


def add_dataset_arguments(parser, replay_ratio: float) -> None:
    """The command-line options every dataset-based builder takes."""
    parser.add_argument("--dataset", action="append", required=True, metavar="[NAME=]KIND:ROOT",
                        help="kind: mvtec, visa, realiad, meta or folder")
    parser.add_argument("--out", required=True, help="stage folder to write")
    parser.add_argument("--records", type=int, default=1000, help="new records (replay comes on top)")
    parser.add_argument("--replay", help="earlier stage folder to mix in")
    parser.add_argument("--replay-ratio", type=float, default=replay_ratio, help="share of its records mixed in")
    parser.add_argument("--benchmark", action="append", default=[], metavar="KIND:ROOT",
                        help="a benchmark dataset whose test split must never appear in training records")
    parser.add_argument("--model", help="checkpoint the records are for: box coordinates are in pixels of its "
                                        "processor's resize (default: the released Qwen2.5-VL processor's)")
    add_pixel_limit_arguments(parser, "--model's processor's, else the released Qwen2.5-VL processor's; train with "
                                      "the same")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--restart", action="store_true", help="rebuild from scratch instead of resuming")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out (and count) unusable samples instead of stopping at the first")


def indexed_sources(args, categories: set[str] | None = None):
    """(sources, held-out benchmark images, indexed pools) of a builder's `--dataset` / `--benchmark`
    / `--skip-bad` options: the benchmark's test images never enter a pool."""
    sources = [DatasetSource.parse(d) for d in args.dataset]
    held_out = benchmark_test_images([DatasetSource.parse(b) for b in args.benchmark])
    return sources, held_out, index_sources(sources, held_out, categories, args.skip_bad)


def with_replay(roots: dict[str, str], records: Iterable[TrainingRecord], folder: Path, ratio: float,
                seed: int, pixels: tasks.ResizeRule | None = None) -> tuple[dict[str, str], Iterator[TrainingRecord]]:
    """The new records followed by the replayed `ratio` share of an earlier stage's `folder`, with
    the roots of both. With `pixels`, an earlier stage whose boxes are in another resize is refused."""
    check_same_pixels(Path(folder), pixels)
    replay_roots, replay_records = replayed(Path(folder), ratio, seed)
    return {**roots, **replay_roots}, (r for part in (records, replay_records) for r in part)


def check_same_pixels(folder: Path, pixels: tasks.ResizeRule | None) -> None:
    """Refuse to mix in a stage whose box coordinates are in another resize than `pixels`."""
    recorded = StageInfo.read(folder).pixels
    if pixels is not None and recorded is not None and recorded != asdict(pixels):
        raise ValueError(f"{folder} was built for images resized with {recorded}, this stage with {asdict(pixels)}: "
                         "their box coordinates are in different pixel frames. Build both with the same --model / "
                         "--min-pixels / --max-pixels.")


def pixel_rule(args) -> tasks.ResizeRule:
    """The resize the builder computes box coordinates in: `--model`'s processor's (default: the released
    Qwen2.5-VL processor's), with `--min-pixels` / `--max-pixels` over it."""
    rule = tasks.ResizeRule()
    if args.model:
        from ..model.checkpoint import load_processor

        try:
            rule = tasks.ResizeRule.of_processor(load_processor(args.model))
        except (OSError, ValueError) as err:
            raise ValueError(f"--model {args.model}: cannot read its processor's pixel limits ({err})") from err
    return replace(rule, min_pixels=rule.min_pixels if args.min_pixels is None else args.min_pixels,
                   max_pixels=rule.max_pixels if args.max_pixels is None else args.max_pixels)


def write_with_replay(args, stage: int, roots: dict[str, str], records: Iterator[TrainingRecord],
                      benchmark_test: set[Path], pixels: tasks.ResizeRule | None = None) -> StageInfo:
    """Write the new records, then the replayed share of `--replay`, into `--out`; `pixels` is the
    resize the records' boxes are in (`pixel_rule(args)`)."""
    total = args.records
    if args.replay:
        roots, records = with_replay(roots, records, args.replay, args.replay_ratio, args.seed, pixels)
        total = None
    return write_stage(Path(args.out), stage, roots, records, benchmark_test, args.records_per_shard,
                       resume=not args.restart, config=vars(args), progress_total=total, pixels=pixels)
