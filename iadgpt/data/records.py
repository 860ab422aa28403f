"""Training records: what the stage builders write and the training collator reads.

A stage folder holds JSONL shards of records plus `info.json`, which declares the image roots:

    stage3/
      info.json            {"stage": 3, "roots": {"mvtec": "/data/mvtec_ad"}, "shards": [...], ...}
      shard-00000.jsonl    one TrainingRecord per line
      shard-00001.jsonl

A record names its root by key and its images (and the query's defect mask) by paths relative to
that root, so a stage can mix datasets (replay) and the whole folder can move with its data.
The shards load with `datasets.load_dataset("json", data_files=...)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .samples import DataError, resolve_under_root

TASKS = (
    "caption",  # stage 1: describe an industrial image
    "odd_one_out",  # stage 2: which image of a group differs
    "difference_regions",  # stage 2: where two images of one product differ
    "irregular_region",  # stage 2: where a single image is irregular
    "detection",  # stage 3: is the query defective, given normal exemplars
    "localization",  # stage 3: where is the defect in the query
    "reasoning",  # stage 3: free-text questions about the defect
)
IMAGE_ROLES = ("exemplar", "query", "other")


@dataclass
class TrainingRecord:
    """One training conversation with its images."""

    id: str
    """Unique within the stage (stable across re-runs with the same seed)."""
    task: str
    """One of TASKS."""
    root: str
    """Key into info.json's `roots`: the folder the image paths are relative to."""
    images: list[str]
    """Image paths relative to the root, in the order of the {"type": "image"} items in `messages`."""
    image_roles: list[str]
    """Per image: "exemplar" (normal reference, compressible), "query" (inspected) or "other"."""
    messages: list[dict[str, Any]]
    """Qwen chat format: [{"role": "user"|"assistant"|"system", "content": [{"type": "text", ...} |
    {"type": "image"}]}]. Only assistant turns are trained on."""
    mask: str | None = None
    """Defect mask of the query image, relative to the root (all-zero mask: None and label 0)."""
    label: int | None = None
    """1 anomalous, 0 normal, None when the task has no such label."""
    category: str | None = None
    """Product category of the query image."""
    source: str = ""
    """Dataset the record was built from."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (defect type, synthetic defect kind, ...)."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"record {self.id}: task {self.task!r} is not one of {list(TASKS)}")
        if len(self.images) != len(self.image_roles):
            raise ValueError(f"record {self.id}: {len(self.images)} images but {len(self.image_roles)} roles")
        bad = [r for r in self.image_roles if r not in IMAGE_ROLES]
        if bad:
            raise ValueError(f"record {self.id}: image roles {bad} not in {list(IMAGE_ROLES)}")
        placeholders = sum(1 for m in self.messages for c in _content(m) if c.get("type") == "image")
        if placeholders != len(self.images):
            raise ValueError(f"record {self.id}: messages hold {placeholders} image placeholders "
                             f"for {len(self.images)} images")
        if not any(m.get("role") == "assistant" for m in self.messages):
            raise ValueError(f"record {self.id}: no assistant turn to train on")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> "TrainingRecord":
        try:
            return cls(**data)
        except TypeError as err:
            raise DataError(f"{where}: not a training record ({err})") from err
        except ValueError as err:
            raise DataError(f"{where}: {err}") from err


def _content(message: dict) -> list[dict]:
    content = message.get("content", [])
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


@dataclass
class StageInfo:
    """`info.json` of a stage folder."""

    stage: int
    roots: dict[str, str]
    shards: list[str] = field(default_factory=list)
    num_records: int = 0
    complete: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    pixels: dict[str, int] | None = None
    """The image resize the records' box coordinates are in (`tasks.ResizeRule` as a dict: factor,
    min_pixels, max_pixels); training refuses a processor that resizes otherwise. None: the stage
    writes no boxes (stage 1), or was built before this was recorded."""

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "StageInfo":
        path = Path(folder) / "info.json"
        if not path.is_file():
            raise DataError(f"{folder} is not a stage folder: it has no info.json (build it with data_builders/).")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{path}: not a valid stage info file ({err})") from err

    def write(self, folder: str | os.PathLike) -> None:
        _atomic_write(Path(folder) / "info.json", json.dumps(asdict(self), indent=2) + "\n")

    def image_path(self, record: TrainingRecord, relative: str) -> Path:
        if record.root not in self.roots:
            raise DataError(f"record {record.id}: root {record.root!r} is not declared in info.json "
                            f"(declared: {sorted(self.roots)})")
        return resolve_under_root(self.roots[record.root], relative)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _count_records(path: Path) -> int:
    with path.open() as handle:
        return sum(1 for line in handle if line.strip())


def _argument(value: Any) -> str:
    if value is None:
        return "(unset)"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_records(folder: str | os.PathLike) -> Iterator[TrainingRecord]:
    """Stream the records of a stage folder, validating each; errors name the shard and line."""
    folder = Path(folder)
    info = StageInfo.read(folder)
    if not info.complete:
        raise DataError(f"{folder}: the build did not finish (info.json complete=false); re-run the builder.")
    for shard in info.shards:
        path = folder / shard
        with path.open() as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: malformed JSON ({err.msg})") from err
                yield TrainingRecord.from_dict(data, where=f"{path}:{line_number}")


RESUME_IGNORES = frozenset({"restart", "out"})
"""Builder arguments a resumed build may change: how it was started and where the folder is."""


class ShardWriter:
    """Writes records into fixed-size shards, each renamed into place only when complete.

    A crashed build leaves whole shards and at most one `.tmp`; re-running with `resume=True` skips
    the records of the finished shards (the builder must produce records in a deterministic order).
    A resume is refused unless the build is the same one: the same stage, roots and builder
    arguments (`info.config`, but RESUME_IGNORES) and shards of `records_per_shard` records;
    otherwise the skipped count would no longer match what the shards hold.
    """

    def __init__(self, folder: str | os.PathLike, info: StageInfo, records_per_shard: int = 1000,
                 resume: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.info = info
        self.records_per_shard = records_per_shard
        finished = sorted(p.name for p in self.folder.glob("shard-*.jsonl")) if resume else []
        done = self._check_same_build(finished) if finished else 0
        if not resume:
            for stale in self.folder.glob("shard-*.jsonl*"):
                stale.unlink()
        self.info.shards = finished
        self.skip = done
        self.info.num_records = self.skip
        self._buffer: list[str] = []
        self.seen = 0
        self.info.complete = False
        self.info.write(self.folder)

    def _check_same_build(self, finished: list[str]) -> int:
        """The records the `finished` shards hold, once the earlier build is known to be this one."""
        restart = "; re-run with the same arguments to resume it, or add --restart to rebuild it from scratch."
        try:
            earlier = StageInfo.read(self.folder)
        except DataError as err:
            raise DataError(f"{self.folder} holds shards but no readable info.json ({err}): cannot tell how they "
                            "were built" + restart) from err
        changed = [f"stage {earlier.stage} -> {self.info.stage}"] if earlier.stage != self.info.stage else []
        for key in sorted((set(earlier.config) | set(self.info.config)) - RESUME_IGNORES):
            before, now = earlier.config.get(key), self.info.config.get(key)
            if before != now:
                changed.append(f"--{key.replace('_', '-')} {_argument(before)} -> {_argument(now)}")
        if earlier.roots != self.info.roots and not changed:
            changed.append(f"image roots {earlier.roots} -> {self.info.roots}")
        counts = [_count_records(self.folder / name) for name in finished]
        for index, (name, count) in enumerate(zip(finished, counts) if not changed else []):
            last = index == len(finished) - 1  # a finished build's last shard holds the rest
            if count != self.records_per_shard and not (last and earlier.complete and count < self.records_per_shard):
                changed.append(f"{count} records in {name} -> {self.records_per_shard} per shard")
                break
        if changed:
            raise DataError(f"{self.folder} was built with other arguments ({', '.join(changed)})" + restart)
        return sum(counts)

    def write(self, records: Iterable[TrainingRecord]) -> None:
        for record in records:
            self.seen += 1
            if self.seen <= self.skip:
                continue  # already in a finished shard
            self._buffer.append(record.to_json())
            if len(self._buffer) == self.records_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{len(self.info.shards):05d}.jsonl"
        _atomic_write(self.folder / name, "\n".join(self._buffer) + "\n")
        self.info.shards.append(name)
        self.info.num_records += len(self._buffer)
        self._buffer = []
        self.info.write(self.folder)

    def close(self) -> StageInfo:
        self._flush()
        self.info.complete = True
        self.info.write(self.folder)
        return self.info
