"""Readers for the anomaly-detection and instruction datasets users already have on disk.

Every reader lists paths and labels without decoding a single image: `samples()` is a generator that
walks folders or metadata, so a build can stream a 150k-image dataset with flat memory, and images
are decoded later, one at a time, with `iadgpt.data.samples.load_image` / `load_sample`. What a
reader can check without decoding (a metadata row pointing at a missing file, an anomalous image
with no mask, a path leaving the dataset root, an empty category, a malformed JSON line), it checks,
and raises a `DataError` naming the file and the line or record. Constructed with `skip_bad=True`, a
reader instead leaves such samples out and counts them by reason in `reader.skipped` (a Counter,
reset at the start of every pass over `samples()`, complete once the pass is consumed), with a few
of the messages in `reader.skipped_examples`, so that one bad row in 100k does not stop a build but
is never silently lost either.

Layouts (`open_dataset(kind, root)`):
  mvtec    MVTec-AD folders.
  visa     VisA with its split file `split_csv/1cls.csv`.
  realiad  Real-IAD: per-category JSON in `realiad_jsons/`, images in `realiad_<resolution>/`.
  meta     the `meta.json` of CLIP-based anomaly repos (WinCLIP/AnomalyCLIP/AdaCLIP style).
  folder   a plain folder of a user's own parts.
Instruction data: `LLaVAConversationReader` (Anomaly-Instruct-125k), `VisaDRReader` (VisA-D&R),
`MMADReader` (MMAD). Each reader's docstring states the exact layout it expects.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .samples import (
    IMAGE_EXTENSIONS,
    NORMAL_DEFECT_TYPE,
    SPLITS,
    DataError,
    Sample,
    resolve_under_root,
)

__all__ = [
    "DATASET_KINDS",
    "Conversation",
    "DatasetReader",
    "DetectionItem",
    "FolderReader",
    "LLaVAConversationReader",
    "MMADItem",
    "MMADReader",
    "MVTecReader",
    "MetaJsonReader",
    "MultipleChoiceQuestion",
    "REALIAD_DEFECT_NAMES",
    "RealIADReader",
    "ReasoningItem",
    "Turn",
    "VisAReader",
    "VisaDRReader",
    "open_dataset",
]

logger = logging.getLogger(__name__)

MAX_SKIPPED_EXAMPLES = 20
"""Messages kept per skip reason: enough to find the pattern, bounded for million-row datasets."""

# Skip reasons, the keys of `reader.skipped`.
SKIP_MISSING_MASK = "missing mask"
SKIP_MISSING_FILE = "missing file"
SKIP_PATH_ESCAPE = "path escapes dataset root"
SKIP_INVALID_RECORD = "invalid record"
SKIP_MALFORMED_JSON = "malformed JSON"
SKIP_EMPTY_FOLDER = "empty folder"

REALIAD_DEFECT_NAMES: dict[str, str] = {
    "AK": "pit",
    "BX": "deformation",
    "CH": "abrasion",
    "HS": "scratch",
    "PS": "damage",
    "QS": "missing_parts",
    "YW": "foreign_objects",
    "ZW": "contamination",
}
"""Real-IAD's two-letter `anomaly_class` codes, as words a prompt can use (unknown codes pass as is)."""


# --------------------------------------------------------------------------------------------------
# Shared plumbing


class _SkipLedger:
    """Raise, or (with skip_bad) count and remember, what a pass over a dataset had to leave out."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: Counter[str] = Counter()
        self.skipped_examples: dict[str, list[str]] = {}

    def _begin_pass(self) -> None:
        self.skipped = Counter()
        self.skipped_examples = {}

    def _test_samples(self, category: str, classes: list[tuple[str, list[Path]]], mask_root: Path,
                      what: str) -> Iterator[Sample]:
        """Test samples of a folder-per-class layout: `good` images are normal, every other class
        folder's are anomalous with that defect type and a mask `mask_root/<defect>/<pattern>`
        (`MASK_NAME_PATTERNS`, first found); a missing mask is rejected when masks are required."""
        for defect, images in classes:
            for image in images:
                if defect == NORMAL_DEFECT_TYPE:
                    yield Sample(image, category, False, NORMAL_DEFECT_TYPE, None, "test")
                    continue
                candidates = [mask_root / defect / pattern.format(stem=image.stem)
                              for pattern in self.MASK_NAME_PATTERNS]
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None and self.require_masks:
                    self._reject(SKIP_MISSING_MASK, DataError(
                        f"{image}: {what} has no mask (looked for {', '.join(str(c) for c in candidates)})"))
                    continue
                yield Sample(image, category, True, defect, mask, "test")

    def _reject(self, reason: str, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < MAX_SKIPPED_EXAMPLES:
            examples.append(str(error))

    def _invalid(self, message: str) -> None:
        self._reject(SKIP_INVALID_RECORD, DataError(message))

    def _end_pass(self, what: object) -> None:
        if self.skipped:
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            logger.warning("%s: skipped %s (see .skipped_examples)", what, summary)


def _absolute(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalised, symlinks kept: sample paths stay under the root the user gave."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def _existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    folder = _absolute(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} does not exist or is not a folder")
    return folder


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist or is not a file")
    return path


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted so that passes (and seeded draws from them) are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Visible image files, sorted. Hidden files are skipped: macOS `._name.png` copies would
    otherwise pass the extension test and fail at decode."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _metadata_path(value: str) -> str:
    """Metadata written on Windows uses backslashes, which on POSIX would be part of a file name."""
    return value.replace("\\", "/")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------------
# Anomaly-detection datasets


class DatasetReader(_SkipLedger):
    """Common interface: `categories()` and a lazy `samples(split=None, category=None)`."""

    kind: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike[str], *, skip_bad: bool = False) -> None:
        super().__init__(skip_bad)
        self.root = _existing_dir(root, "dataset root")
        self._check_files = True

    def categories(self) -> list[str]:
        """Category names, sorted."""
        raise NotImplementedError

    def samples(self, split: str | None = None, category: str | None = None) -> Iterator[Sample]:
        """Every sample of `split` ("train", "test" or None for both) and `category` (None: all).

        Arguments are checked now; the dataset is walked as the iterator is consumed, never
        opening an image. `self.skipped` describes the last pass once it is consumed.
        """
        _check_split(split)
        known = self.categories()
        if category is not None and category not in known:
            raise ValueError(f"{self.root}: no category {category!r}; categories: {', '.join(known)}")
        wanted = known if category is None else [category]
        return self._pass(wanted, split)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _pass(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        self._begin_pass()
        yield from self._generate(categories, split)
        self._end_pass(self)

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        raise NotImplementedError

    def _splits(self, split: str | None) -> tuple[str, ...]:
        return SPLITS if split is None else (split,)

    def _metadata_file(self, root: Path, location: str, value: Any, what: str) -> Path | None:
        """Resolve a path written in metadata; None (after `_reject`) when it escapes or is missing."""
        try:
            path = resolve_under_root(root, _metadata_path(value))
        except DataError as error:
            self._reject(SKIP_PATH_ESCAPE, DataError(f"{location}: {error}"))
            return None
        if self._check_files and not path.is_file():
            self._reject(SKIP_MISSING_FILE, DataError(f"{location}: {what} file {path} does not exist"))
            return None
        return path


class MVTecReader(DatasetReader):
    """MVTec-AD and the many datasets shipped in its layout (MPDD, BTAD-converted, synthetic sets).

    Layout, for each category folder `<root>/<cat>/`:
        train/good/*.<img>                       normal training images
        test/good/*.<img>                        normal test images
        test/<defect>/<name>.<img>               anomalous test images, defect type = folder name
        ground_truth/<defect>/<name>_mask.png    their masks (`<name>.png` is accepted too)
    A folder counts as a category when it has `train/` or `test/`. `root` may also be a single
    category folder (it then has `train/` or `test/` itself). Only `train/good` is read from
    `train/`. An anomalous test image without a mask is an error (a pixel-level benchmark would
    otherwise score it against nothing) unless `require_masks=False` (mask_path None) or
    `skip_bad=True` (left out and counted). A category with no image at all, or whose
    `train/good` is empty, is an error naming the folder.
    """

    kind = "mvtec"
    MASK_NAME_PATTERNS: ClassVar[tuple[str, ...]] = ("{stem}_mask.png", "{stem}.png")

    def __init__(
        self, root: str | os.PathLike[str], *, skip_bad: bool = False, require_masks: bool = True
    ) -> None:
        super().__init__(root, skip_bad=skip_bad)
        self.require_masks = require_masks

    def _category_folders(self) -> dict[str, Path]:
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            return {self.root.name: self.root}
        return {
            folder.name: folder
            for folder in _subfolders(self.root)
            if (folder / "train").is_dir() or (folder / "test").is_dir()
        }

    def categories(self) -> list[str]:
        folders = self._category_folders()
        if not folders:
            raise DataError(
                f"{self.root}: no MVTec-AD category folders (expected <category>/train/good and "
                "<category>/test/<defect> inside)"
            )
        return sorted(folders)

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        folders = self._category_folders()
        for category in categories:
            yield from self._category_samples(category, folders[category], split)

    def _category_samples(self, category: str, folder: Path, split: str | None) -> Iterator[Sample]:
        train_good = folder / "train" / "good"
        train_images = _image_files(train_good) if train_good.is_dir() else []
        test_folder = folder / "test"
        test_classes = (
            [(class_folder, _image_files(class_folder)) for class_folder in _subfolders(test_folder)]
            if test_folder.is_dir()
            else []
        )
        if not train_images and not any(images for _, images in test_classes):
            self._reject(SKIP_EMPTY_FOLDER, DataError(f"{folder}: category folder contains no images"))
            return
        if split in (None, "train"):
            if train_good.is_dir() and not train_images:
                self._reject(SKIP_EMPTY_FOLDER, DataError(f"{train_good}: training folder contains no images"))
            for image in train_images:
                yield Sample(image, category, False, NORMAL_DEFECT_TYPE, None, "train")
        if split in (None, "test"):
            yield from self._test_samples(category, [(f.name, images) for f, images in test_classes],
                                          folder / "ground_truth", "anomalous test image")


class FolderReader(DatasetReader):
    """A plain folder of a user's own parts: the least a user has to arrange to get started.

    Layout, for each category folder `<root>/<category>/`:
        good/*.<img>                     normal images
        <defect>/*.<img>                 anomalous images, defect type = folder name
        masks/<defect>/<stem>.png        optional mask of `<defect>/<stem>.<img>`
                                         (`<stem>_mask.png` is accepted too; first found wins)
        train/good/*.<img>               optional: normal images reserved for training/exemplars
    Splits: all images are "test" unless `<category>/train/good` exists; then its images are
    "train" and everything else stays "test" (so the benchmark split is never used as exemplars).
    `train`, `test` and `masks` are reserved names, never defect types; a `test/` folder is refused
    because it means an MVTec-AD tree (use kind "mvtec"). Loose files directly in a category folder
    are ignored. `root` may itself be a single category (it has `good/` or `train/good/`).
    Masks are optional: an anomalous image without one gets mask_path None, unless
    `require_masks=True`. A category folder with no image is an error naming it.
    """

    kind = "folder"
    RESERVED_FOLDERS: ClassVar[frozenset[str]] = frozenset({"train", "test", "masks"})
    MASK_NAME_PATTERNS: ClassVar[tuple[str, ...]] = ("{stem}.png", "{stem}_mask.png")

    def __init__(
        self, root: str | os.PathLike[str], *, skip_bad: bool = False, require_masks: bool = False
    ) -> None:
        super().__init__(root, skip_bad=skip_bad)
        self.require_masks = require_masks

    def _category_folders(self) -> dict[str, Path]:
        if (self.root / NORMAL_DEFECT_TYPE).is_dir() or (self.root / "train" / "good").is_dir():
            return {self.root.name: self.root}
        return {folder.name: folder for folder in _subfolders(self.root)}

    def categories(self) -> list[str]:
        folders = self._category_folders()
        if not folders:
            raise DataError(f"{self.root}: no category folders (expected <category>/good and <category>/<defect>)")
        return sorted(folders)

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        folders = self._category_folders()
        for category in categories:
            yield from self._category_samples(category, folders[category], split)

    def _category_samples(self, category: str, folder: Path, split: str | None) -> Iterator[Sample]:
        if (folder / "test").is_dir():
            raise DataError(
                f"{folder}: has a 'test' folder, which the plain folder layout does not use; "
                "this looks like an MVTec-AD tree: open it with kind='mvtec'"
            )
        train_good = folder / "train" / "good"
        train_images = _image_files(train_good) if train_good.is_dir() else []
        classes = [
            (class_folder.name, _image_files(class_folder))
            for class_folder in _subfolders(folder)
            if class_folder.name not in self.RESERVED_FOLDERS
        ]
        if not train_images and not any(images for _, images in classes):
            self._reject(
                SKIP_EMPTY_FOLDER,
                DataError(f"{folder}: category folder contains no images (expected good/ and <defect>/ folders)"),
            )
            return
        if train_good.is_dir() and not train_images:
            self._reject(SKIP_EMPTY_FOLDER, DataError(f"{train_good}: training folder contains no images"))
        if split in (None, "train"):
            for image in train_images:
                yield Sample(image, category, False, NORMAL_DEFECT_TYPE, None, "train")
        if split not in (None, "test"):
            return
        yield from self._test_samples(category, classes, folder / "masks", "anomalous image")


class VisAReader(DatasetReader):
    """VisA, split by its CSV file.

    Layout: `<root>/split_csv/1cls.csv` (or `split_csv=` another of VisA's split files, relative to
    root or absolute) with columns `object,split,label,image,mask`: split "train"/"test", label
    "normal"/"anomaly", image and mask paths relative to `<root>` (images in
    `<object>/Data/Images/{Normal,Anomaly}/`, masks in `<object>/Data/Masks/Anomaly/`, mask empty
    for normal rows). VisA masks store small non-zero ids: `load_mask` binarises with != 0.
    Defect type: VisA's split file has none, so anomalous samples are "anomaly", unless the
    category's `<root>/<object>/image_anno.csv` (columns image,label) names the defect of that
    image; its words are joined by underscores ("chunk of gum missing" -> "chunk_of_gum_missing").
    Every row is checked against the disk without opening images (`check_files=False` skips the
    stat calls); errors name the CSV file and line.
    """

    kind = "visa"
    REQUIRED_COLUMNS: ClassVar[tuple[str, ...]] = ("object", "split", "label", "image", "mask")
    LABELS: ClassVar[dict[str, bool]] = {"normal": False, "anomaly": True}
    GENERIC_DEFECT_TYPE: ClassVar[str] = "anomaly"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        split_csv: str | os.PathLike[str] = "split_csv/1cls.csv",
        skip_bad: bool = False,
        require_masks: bool = True,
        check_files: bool = True,
    ) -> None:
        super().__init__(root, skip_bad=skip_bad)
        self.split_csv = _existing_file(self.root / split_csv, "VisA split file")
        self.require_masks = require_masks
        self._check_files = check_files
        self._categories: list[str] | None = None
        self._defect_names: dict[str, dict[str, str]] = {}

    def _rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        """(line number, row) for each data row; the header is checked first."""
        with self.split_csv.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            missing = [c for c in self.REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{self.split_csv}:1: missing column(s) {', '.join(missing)}; "
                    f"expected {','.join(self.REQUIRED_COLUMNS)}"
                )
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as error:
                raise DataError(f"{self.split_csv}:{reader.line_num}: unreadable CSV ({error})") from error

    def categories(self) -> list[str]:
        if self._categories is None:
            names = {(row.get("object") or "").strip() for _, row in self._rows()}
            names.discard("")
            if not names:
                raise DataError(f"{self.split_csv}: split file lists no images")
            self._categories = sorted(names)
        return list(self._categories)

    def _defect_name(self, category: str, relative_image: str) -> str:
        if category not in self._defect_names:
            names: dict[str, str] = {}
            annotation = self.root / category / "image_anno.csv"
            if annotation.is_file():
                with annotation.open(newline="", encoding="utf-8-sig") as stream:
                    for row in csv.DictReader(stream):
                        image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
                        if image and label and label.lower() != "normal":
                            names[os.path.normpath(_metadata_path(image))] = "_".join(label.split())
            self._defect_names[category] = names
        key = os.path.normpath(_metadata_path(relative_image))
        return self._defect_names[category].get(key, self.GENERIC_DEFECT_TYPE)

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        wanted = set(categories)
        for line, row in self._rows():
            location = f"{self.split_csv}:{line}"
            category = (row.get("object") or "").strip()
            if category not in wanted:
                continue
            row_split = (row.get("split") or "").strip().lower()
            if row_split not in SPLITS:
                self._invalid(f"{location}: split {row.get('split')!r} is not 'train' or 'test'")
                continue
            if split is not None and row_split != split:
                continue
            label = (row.get("label") or "").strip().lower()
            if label not in self.LABELS:
                self._invalid(f"{location}: label {row.get('label')!r} is not 'normal' or 'anomaly'")
                continue
            is_anomalous = self.LABELS[label]
            relative_image = (row.get("image") or "").strip()
            if not relative_image:
                self._invalid(f"{location}: empty image path")
                continue
            image = self._metadata_file(self.root, location, relative_image, "image")
            if image is None:
                continue
            relative_mask = (row.get("mask") or "").strip()
            mask = None
            if relative_mask:
                mask = self._metadata_file(self.root, location, relative_mask, "mask")
                if mask is None:
                    continue
            elif is_anomalous and self.require_masks:
                self._reject(SKIP_MISSING_MASK, DataError(f"{location}: anomalous image {image} has no mask"))
                continue
            defect = self._defect_name(category, relative_image) if is_anomalous else NORMAL_DEFECT_TYPE
            yield Sample(image, category, is_anomalous, defect, mask, row_split)  # type: ignore[arg-type]


class RealIADReader(DatasetReader):
    """Real-IAD, from its per-category JSON files.

    Layout (as released, and as anomalib reads it):
        <root>/realiad_jsons/<cat>.json  or  <root>/realiad_jsons/realiad_jsons/<cat>.json
        <root>/realiad_<resolution>/<cat>/OK/S0001/<cat>_0001_OK_C1_<time>.jpg
        <root>/realiad_<resolution>/<cat>/NG/<code>/S0123/<...>.jpg and <...>_mask.png
    Each JSON file is `{"meta": {"normal_class": "OK", ...}, "train": [...], "test": [...]}`, items
    `{"category", "anomaly_class", "image_path", "mask_path"}`; anomaly_class equal to
    meta.normal_class ("OK" when absent) means normal, anything else is the defect code (mapped to
    a word by `REALIAD_DEFECT_NAMES`); mask_path is null for normal items. Paths are relative to
    `realiad_<resolution>/<cat>/`; a path that already starts with `<cat>/` is taken relative to
    `realiad_<resolution>/` (some re-packaged copies write it so). `json_dir` and `image_dir`
    (relative to root, or absolute) override the two folders; resolution is 256, 512, 1024 or
    "raw". The category list is the JSON files' names. Each category's JSON is parsed when the
    pass reaches it (they are large); images are only stat-ed (`check_files=False`: not even that).
    """

    kind = "realiad"
    JSON_DIR_CANDIDATES: ClassVar[tuple[str, ...]] = ("realiad_jsons/realiad_jsons", "realiad_jsons")

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        resolution: int | str = 1024,
        json_dir: str | os.PathLike[str] | None = None,
        image_dir: str | os.PathLike[str] | None = None,
        skip_bad: bool = False,
        require_masks: bool = True,
        check_files: bool = True,
    ) -> None:
        super().__init__(root, skip_bad=skip_bad)
        if json_dir is not None:
            self.json_dir = _existing_dir(self.root / json_dir, "Real-IAD JSON folder")
        else:
            found = [self.root / c for c in self.JSON_DIR_CANDIDATES if any((self.root / c).glob("*.json"))]
            if not found:
                raise DataError(
                    f"{self.root}: no Real-IAD JSON files in "
                    f"{' or '.join(str(self.root / c) for c in self.JSON_DIR_CANDIDATES)}"
                )
            self.json_dir = found[0]
        self.image_dir = _existing_dir(self.root / (image_dir or f"realiad_{resolution}"), "Real-IAD image folder")
        self.require_masks = require_masks
        self._check_files = check_files

    def categories(self) -> list[str]:
        return sorted(p.stem for p in self.json_dir.glob("*.json") if not p.name.startswith("."))

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        for category in categories:
            yield from self._category_samples(category, split)

    def _category_samples(self, category: str, split: str | None) -> Iterator[Sample]:
        json_file = self.json_dir / f"{category}.json"
        document = _load_json_document(json_file)
        if not isinstance(document, dict) or not any(key in document for key in SPLITS):
            raise DataError(f"{json_file}: expected an object with 'train' and/or 'test' lists")
        meta = document.get("meta") if isinstance(document.get("meta"), dict) else {}
        normal_class = str(meta.get("normal_class") or "OK")
        for split_name in self._splits(split):
            items = document.get(split_name, [])
            if not isinstance(items, list):
                raise DataError(f"{json_file}: '{split_name}' must be a list, got {type(items).__name__}")
            for index, item in enumerate(items):
                location = f"{json_file} [{split_name}][{index}]"
                sample = self._item_sample(item, location, category, normal_class, split_name)
                if sample is not None:
                    yield sample

    def _item_sample(
        self, item: Any, location: str, category: str, normal_class: str, split_name: str
    ) -> Sample | None:
        if not isinstance(item, dict):
            self._invalid(f"{location}: item must be an object, got {_describe(item)}")
            return None
        image_path, anomaly_class = item.get("image_path"), item.get("anomaly_class")
        if not isinstance(image_path, str) or not image_path.strip():
            self._invalid(f"{location}: missing or empty 'image_path'")
            return None
        if not isinstance(anomaly_class, str) or not anomaly_class.strip():
            self._invalid(f"{location}: missing or empty 'anomaly_class'")
            return None
        is_anomalous = anomaly_class.strip() != normal_class
        image = self._metadata_file(self._base_for(image_path, category), location, image_path, "image")
        if image is None:
            return None
        mask_value = item.get("mask_path")
        mask = None
        if isinstance(mask_value, str) and mask_value.strip():
            mask = self._metadata_file(self._base_for(mask_value, category), location, mask_value, "mask")
            if mask is None:
                return None
        elif is_anomalous and self.require_masks:
            self._reject(SKIP_MISSING_MASK, DataError(f"{location}: anomalous image {image} has no mask_path"))
            return None
        code = anomaly_class.strip()
        defect = REALIAD_DEFECT_NAMES.get(code, code) if is_anomalous else NORMAL_DEFECT_TYPE
        return Sample(image, category, is_anomalous, defect, mask, split_name)  # type: ignore[arg-type]

    def _base_for(self, relative: str, category: str) -> Path:
        if _metadata_path(relative).startswith(f"{category}/"):
            return self.image_dir
        return self.image_dir / category


class MetaJsonReader(DatasetReader):
    """The `meta.json` layout of CLIP-based anomaly repos (WinCLIP, AnomalyCLIP, AdaCLIP, ...).

    Layout: `<root>/meta.json` (or `meta_file=`) = `{"train": {cls: [item, ...]}, "test": {...}}`,
    each item `{"img_path", "mask_path" ("" for normal), "cls_name", "specie_name", "anomaly"}` with
    anomaly 0/1 and paths relative to `<root>`. specie_name is the defect type (normal items get
    "good" whatever it says); an anomalous item must not say "good". The file is parsed once, at
    construction (it is metadata only), so a malformed one fails immediately with its line.
    """

    kind = "meta"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        meta_file: str | os.PathLike[str] = "meta.json",
        skip_bad: bool = False,
        require_masks: bool = True,
        check_files: bool = True,
    ) -> None:
        super().__init__(root, skip_bad=skip_bad)
        self.meta_file = _existing_file(self.root / meta_file, "meta.json file")
        self.require_masks = require_masks
        self._check_files = check_files
        document = _load_json_document(self.meta_file)
        if not isinstance(document, dict) or not any(key in document for key in SPLITS):
            raise DataError(f"{self.meta_file}: expected an object with 'train' and/or 'test' keys")
        for split_name in SPLITS:
            by_class = document.get(split_name, {})
            if not isinstance(by_class, dict) or not all(isinstance(v, list) for v in by_class.values()):
                raise DataError(f"{self.meta_file}: '{split_name}' must map class names to lists of items")
        self._document: dict[str, dict[str, list[Any]]] = document

    def categories(self) -> list[str]:
        return sorted({name for split_name in SPLITS for name in self._document.get(split_name, {})})

    def _generate(self, categories: list[str], split: str | None) -> Iterator[Sample]:
        for split_name in self._splits(split):
            by_class = self._document.get(split_name, {})
            for category in categories:
                for index, item in enumerate(by_class.get(category, [])):
                    location = f"{self.meta_file} [{split_name}][{category}][{index}]"
                    sample = self._item_sample(item, location, category, split_name)
                    if sample is not None:
                        yield sample

    def _item_sample(self, item: Any, location: str, category: str, split_name: str) -> Sample | None:
        if not isinstance(item, dict):
            self._invalid(f"{location}: item must be an object, got {_describe(item)}")
            return None
        image_path, anomaly = item.get("img_path"), item.get("anomaly")
        if not isinstance(image_path, str) or not image_path.strip():
            self._invalid(f"{location}: missing or empty 'img_path'")
            return None
        if anomaly not in (0, 1) or isinstance(anomaly, float):
            self._invalid(f"{location}: 'anomaly' must be 0 or 1, got {_describe(anomaly)}")
            return None
        is_anomalous = bool(anomaly)
        species = item.get("specie_name")
        species = species.strip() if isinstance(species, str) else ""
        if is_anomalous and species == NORMAL_DEFECT_TYPE:
            self._invalid(f"{location}: anomaly=1 but specie_name is 'good'")
            return None
        defect = (species or "anomaly") if is_anomalous else NORMAL_DEFECT_TYPE
        class_name = item.get("cls_name")
        if isinstance(class_name, str) and class_name.strip() and class_name.strip() != category:
            self._invalid(f"{location}: cls_name {class_name!r} differs from the class key {category!r}")
            return None
        image = self._metadata_file(self.root, location, image_path, "image")
        if image is None:
            return None
        mask_value = item.get("mask_path")
        mask = None
        if isinstance(mask_value, str) and mask_value.strip():
            mask = self._metadata_file(self.root, location, mask_value, "mask")
            if mask is None:
                return None
        elif is_anomalous and self.require_masks:
            self._reject(SKIP_MISSING_MASK, DataError(f"{location}: anomalous image {image} has an empty mask_path"))
            return None
        return Sample(image, category, is_anomalous, defect, mask, split_name)  # type: ignore[arg-type]


DATASET_KINDS: dict[str, type[DatasetReader]] = {
    "mvtec": MVTecReader,
    "visa": VisAReader,
    "realiad": RealIADReader,
    "meta": MetaJsonReader,
    "folder": FolderReader,
}


def open_dataset(kind: str, root: str | os.PathLike[str], **options: Any) -> DatasetReader:
    """The reader for layout `kind` at `root`; `options` go to that reader's constructor."""
    reader_class = DATASET_KINDS.get(str(kind).strip().lower())
    if reader_class is None:
        raise DataError(f"unknown dataset kind {kind!r}; allowed kinds: {', '.join(DATASET_KINDS)}")
    return reader_class(root, **options)


# --------------------------------------------------------------------------------------------------
# JSON documents and record streams


def _json_error(path: Path, error: json.JSONDecodeError, what: str = "malformed JSON") -> DataError:
    return DataError(f"{path}:{error.lineno}:{error.colno}: {what}: {error.msg}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from error


def _load_json_document(path: Path) -> Any:
    """A whole JSON file; a syntax error names the file, line and column."""
    _existing_file(path, "JSON file")
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise _json_error(path, error) from error


_WHITESPACE = " \t\n\r"


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _iter_json_container(path: Path, text: str) -> Iterator[tuple[str | int, int, Any]]:
    """(key or index, line, value) for each member of a top-level JSON array or object.

    Members are decoded one at a time, so each one's line number is known (json.load forgets
    them) and a record can be reported as `file:line`. Memory: the text plus one decoded member.
    """
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    opening = text[position : position + 1]
    if opening not in ("[", "{"):
        raise DataError(f"{path}:1: expected a JSON array or object")
    closing = "]" if opening == "[" else "}"
    line, counted_up_to = 1, 0

    def decode(at: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise _json_error(path, error) from error

    def expect(at: int, allowed: str) -> int:
        at = _skip_whitespace(text, at)
        if at >= len(text) or text[at] not in allowed:
            found = "end of file" if at >= len(text) else repr(text[at])
            line_no = text.count("\n", 0, at) + 1
            raise DataError(f"{path}:{line_no}: malformed JSON: expected one of {allowed!r}, found {found}")
        return at

    position = _skip_whitespace(text, position + 1)
    if text[position : position + 1] == closing:
        return
    index = 0
    while True:
        position = _skip_whitespace(text, position)
        line += text.count("\n", counted_up_to, position)
        counted_up_to = position
        if opening == "{":
            key, position = decode(position)
            if not isinstance(key, str):
                raise DataError(f"{path}:{line}: malformed JSON: object key {_describe(key)} is not a string")
            position = expect(position, ":") + 1
            position = _skip_whitespace(text, position)
        else:
            key = index
        value, position = decode(position)
        yield key, line, value
        index += 1
        position = expect(position, "," + closing)
        if text[position] == closing:
            trailing = _skip_whitespace(text, position + 1)
            if trailing < len(text):
                line_no = text.count("\n", 0, trailing) + 1
                raise DataError(f"{path}:{line_no}: malformed JSON: extra data after the top-level {opening}{closing}")
            return
        position += 1


def _iter_json_records(path: Path, ledger: _SkipLedger) -> Iterator[tuple[str, Any]]:
    """(location, record) from a JSON array file or a JSONL file (one object per line).

    Format by content, not extension (".json" files that are really JSONL are common): a file
    starting with `[` is an array, anything else is JSONL. A malformed JSONL line is a DataError
    "file:line" (skippable with skip_bad); a malformed array cannot be resynchronised and always
    raises.
    """
    _existing_file(path, "annotation file")
    with path.open(encoding="utf-8-sig") as stream:
        head = stream.read(4096).lstrip(_WHITESPACE)
        while not head:
            chunk = stream.read(4096)
            if not chunk:
                return
            head = chunk.lstrip(_WHITESPACE)
    if head.startswith("["):
        for index, line, record in _iter_json_container(path, _read_text(path)):
            yield f"{path}:{line} (item {index})", record
        return
    with path.open(encoding="utf-8-sig") as stream:
        try:
            for line_number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    ledger._reject(
                        SKIP_MALFORMED_JSON,
                        DataError(f"{path}:{line_number}: malformed JSON line: {error.msg} (column {error.colno})"),
                    )
                    continue
                yield f"{path}:{line_number}", record
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error})") from error


class _AnnotationReader(_SkipLedger):
    """An instruction-data file plus the folder its image paths are relative to."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        image_root: str | os.PathLike[str] | None = None,
        skip_bad: bool = False,
        check_files: bool = True,
    ) -> None:
        super().__init__(skip_bad)
        self.path = _existing_file(_absolute(path), "annotation file")
        self.image_root = _existing_dir(image_root if image_root is not None else self.path.parent, "image root")
        self.check_files = check_files

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, image_root={str(self.image_root)!r})"

    def _image_file(self, value: Any, location: str, what: str) -> Path | None:
        """Resolve one image path of a record, or `_reject` it (None) as invalid/escaping/missing."""
        if not isinstance(value, str) or not value.strip():
            self._invalid(f"{location}: {what} path must be a non-empty string, got {_describe(value)}")
            return None
        try:
            path = resolve_under_root(self.image_root, _metadata_path(value.strip()))
        except DataError as error:
            self._reject(SKIP_PATH_ESCAPE, DataError(f"{location}: {error}"))
            return None
        if self.check_files and not path.is_file():
            self._reject(SKIP_MISSING_FILE, DataError(f"{location}: {what} file {path} does not exist"))
            return None
        return path

    def _image_files(self, values: list[Any], location: str, what: str) -> tuple[Path, ...] | None:
        paths = []
        for value in values:
            path = self._image_file(value, location, what)
            if path is None:
                return None
            paths.append(path)
        return tuple(paths)


# --------------------------------------------------------------------------------------------------
# LLaVA-style conversations (Anomaly-Instruct-125k)

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: role "human" (the question side) or "gpt" (the answer)."""

    role: Literal["human", "gpt"]
    text: str


@dataclass(frozen=True)
class Conversation:
    """A LLaVA-style instruction record with its images resolved (not decoded)."""

    record_id: str
    images: tuple[Path, ...]
    turns: tuple[Turn, ...]
    source: str
    """`file:line` of the record, so a builder's error about it can point back to the data."""

    @property
    def placeholder_count(self) -> int:
        """`<image>` markers in the text: 0 means the images go before the first question."""
        return sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in self.turns)


class LLaVAConversationReader(_AnnotationReader):
    """LLaVA-style instruction data, e.g. Anomaly-Instruct-125k.

    File: a JSON array or JSONL of `{"id", "image": path | [paths] (optional), "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`. Image paths
    are relative to `image_root` (default: the annotation file's folder) and may not leave it.
    Checked per record, so a bad one is reported as `file:line`: turns alternate human/gpt starting
    with human and ending with gpt (a conversation the chat template can turn into training
    targets); `<image>` appears only in human turns, either nowhere (LLaVA then puts the images
    first) or exactly once per image.
    """

    ROLES: ClassVar[tuple[str, str]] = ("human", "gpt")

    def conversations(self) -> Iterator[Conversation]:
        """Each valid conversation, in file order; `self.skipped` is complete once consumed."""
        self._begin_pass()
        for location, record in _iter_json_records(self.path, self):
            conversation = self._conversation(record, location)
            if conversation is not None:
                yield conversation
        self._end_pass(self)

    __iter__ = conversations

    def _conversation(self, record: Any, location: str) -> Conversation | None:
        if not isinstance(record, dict):
            self._invalid(f"{location}: record must be an object, got {_describe(record)}")
            return None
        raw_turns = record.get("conversations")
        if not isinstance(raw_turns, list) or not raw_turns:
            self._invalid(f"{location}: 'conversations' must be a non-empty list")
            return None
        turns = []
        for number, raw in enumerate(raw_turns):
            expected = self.ROLES[number % 2]
            if not isinstance(raw, dict) or raw.get("from") != expected or not isinstance(raw.get("value"), str):
                self._invalid(
                    f"{location}: turn {number} must be {{'from': '{expected}', 'value': <text>}} "
                    f"(turns alternate human/gpt), got {_describe(raw)}"
                )
                return None
            if expected == "gpt" and IMAGE_PLACEHOLDER in raw["value"]:
                self._invalid(f"{location}: turn {number}: {IMAGE_PLACEHOLDER} in an answer")
                return None
            turns.append(Turn(expected, raw["value"]))
        if turns[-1].role != "gpt":
            self._invalid(f"{location}: the last turn is a question with no answer")
            return None
        raw_images = record.get("image")
        raw_images = [] if raw_images is None else raw_images if isinstance(raw_images, list) else [raw_images]
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
        if placeholders not in (0, len(raw_images)):
            self._invalid(
                f"{location}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(raw_images)} image(s)"
            )
            return None
        images = self._image_files(raw_images, location, "image")
        if images is None:
            return None
        record_id = record.get("id")
        return Conversation(
            record_id=str(record_id) if record_id is not None else location,
            images=images,
            turns=tuple(turns),
            source=location,
        )


# --------------------------------------------------------------------------------------------------
# VisA-D&R


@dataclass(frozen=True)
class DetectionItem:
    """A VisA-D&R detection item: is this image anomalous?"""

    image: Path
    is_anomalous: bool
    category: str | None
    source: str


@dataclass(frozen=True)
class ReasoningItem:
    """A VisA-D&R reasoning item: questions about one image, asked as one multi-turn conversation."""

    image: Path
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    """Reference answers, one per question; empty when the file has none (evaluation-only data)."""
    is_anomalous: bool | None
    category: str | None
    source: str


class VisaDRReader(_AnnotationReader):
    """VisA-D&R (detection and reasoning on VisA images).

    Assumed format, since no reference copy was available to check against: a JSON array or JSONL
    whose records are either detection items `{"image": path, "anomaly": bool}` or reasoning items
    `{"image": path, "questions": [str, ...], "answers": [str, ...]}` (a record with "questions" is a
    reasoning item; "answers", when present, has one entry per question; "anomaly" is optional on
    reasoning items). An optional "category" (or "object") names the VisA object. anomaly may be
    true/false or 0/1. Image paths are relative to `image_root` (default: the file's folder).
    """

    def items(self) -> Iterator[DetectionItem | ReasoningItem]:
        """Detection and reasoning items in file order; `self.skipped` is complete once consumed."""
        self._begin_pass()
        for location, record in _iter_json_records(self.path, self):
            item = self._item(record, location)
            if item is not None:
                yield item
        self._end_pass(self)

    __iter__ = items

    def detection_items(self) -> Iterator[DetectionItem]:
        return (item for item in self.items() if isinstance(item, DetectionItem))

    def reasoning_items(self) -> Iterator[ReasoningItem]:
        return (item for item in self.items() if isinstance(item, ReasoningItem))

    @staticmethod
    def _anomaly_flag(value: Any) -> bool | None:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return None

    def _item(self, record: Any, location: str) -> DetectionItem | ReasoningItem | None:
        if not isinstance(record, dict):
            self._invalid(f"{location}: record must be an object, got {_describe(record)}")
            return None
        category = record.get("category", record.get("object"))
        category = category if isinstance(category, str) and category else None
        has_anomaly = "anomaly" in record
        anomaly = self._anomaly_flag(record.get("anomaly"))
        if has_anomaly and anomaly is None:
            self._invalid(f"{location}: 'anomaly' must be true/false, got {_describe(record.get('anomaly'))}")
            return None
        if "questions" in record:
            questions, answers = record.get("questions"), record.get("answers", [])
            valid_questions = isinstance(questions, list) and bool(questions)
            if not valid_questions or not all(isinstance(q, str) and q.strip() for q in questions):
                self._invalid(f"{location}: 'questions' must be a non-empty list of strings")
                return None
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                self._invalid(f"{location}: 'answers' must be a list of strings")
                return None
            if answers and len(answers) != len(questions):
                self._invalid(f"{location}: {len(questions)} questions but {len(answers)} answers")
                return None
            image = self._image_file(record.get("image"), location, "image")
            if image is None:
                return None
            return ReasoningItem(image, tuple(questions), tuple(answers), anomaly, category, location)
        if not has_anomaly:
            self._invalid(f"{location}: neither a detection item ('anomaly') nor a reasoning item ('questions')")
            return None
        image = self._image_file(record.get("image"), location, "image")
        if image is None:
            return None
        return DetectionItem(image, bool(anomaly), category, location)


# --------------------------------------------------------------------------------------------------
# MMAD


@dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One MMAD question: options as (letter, text) pairs in file order, answer = a letter."""

    question: str
    options: tuple[tuple[str, str], ...]
    answer: str
    question_type: str

    @property
    def answer_text(self) -> str:
        return dict(self.options)[self.answer]


@dataclass(frozen=True)
class MMADItem:
    """One MMAD image with its normal references and multiple-choice questions."""

    image: Path
    mask: Path | None
    similar_templates: tuple[Path, ...]
    """Normal images of the same product retrieved as similar: the few-shot references."""
    random_templates: tuple[Path, ...]
    """Normal images of the same product drawn at random."""
    questions: tuple[MultipleChoiceQuestion, ...]
    source: str


class MMADReader(_AnnotationReader):
    """MMAD (mmad.json): one object keyed by image path.

    Each value: `{"mask_path": path | "" | null, "similar_templates": [paths], "random_templates":
    [paths], "conversation": [{"Question": str, "Options": {"A": str, ...} | [str, ...], "Answer":
    "A", "type": str}, ...]}`. Options given as a list are lettered A, B, C...; the answer must be
    one of the letters; a missing "type" becomes "unspecified". All paths are relative to
    `image_root` (the MMAD data root; default: the file's folder). Records are decoded one at a
    time, so errors name `file:line` and the image key.
    """

    def items(self) -> Iterator[MMADItem]:
        """Each valid item in file order; `self.skipped` is complete once consumed."""
        self._begin_pass()
        for key, line, record in _iter_json_container(self.path, _read_text(self.path)):
            item = self._item(key, record, f"{self.path}:{line} [{key!r}]")
            if item is not None:
                yield item
        self._end_pass(self)

    __iter__ = items

    def _item(self, key: Any, record: Any, location: str) -> MMADItem | None:
        if not isinstance(key, str):
            raise DataError(f"{self.path}: expected an object keyed by image path, found an array")
        if not isinstance(record, dict):
            self._invalid(f"{location}: value must be an object, got {_describe(record)}")
            return None
        conversation = record.get("conversation")
        if not isinstance(conversation, list) or not conversation:
            self._invalid(f"{location}: 'conversation' must be a non-empty list")
            return None
        questions = []
        for number, raw in enumerate(conversation):
            question = self._question(raw, f"{location} question {number}")
            if question is None:
                return None
            questions.append(question)
        templates = {}
        for field_name in ("similar_templates", "random_templates"):
            values = record.get(field_name, [])
            if not isinstance(values, list):
                self._invalid(f"{location}: '{field_name}' must be a list of paths")
                return None
            paths = self._image_files(values, location, field_name)
            if paths is None:
                return None
            templates[field_name] = paths
        image = self._image_file(key, location, "image")
        if image is None:
            return None
        mask_value = record.get("mask_path")
        mask = None
        if mask_value not in (None, ""):
            mask = self._image_file(mask_value, location, "mask")
            if mask is None:
                return None
        return MMADItem(
            image, mask, templates["similar_templates"], templates["random_templates"], tuple(questions), location
        )

    def _question(self, raw: Any, location: str) -> MultipleChoiceQuestion | None:
        if not isinstance(raw, dict):
            self._invalid(f"{location}: must be an object, got {_describe(raw)}")
            return None
        text, options, answer = raw.get("Question"), raw.get("Options"), raw.get("Answer")
        if not isinstance(text, str) or not text.strip():
            self._invalid(f"{location}: missing 'Question'")
            return None
        if isinstance(options, list):
            options = {chr(ord("A") + i): value for i, value in enumerate(options)}
        if (
            not isinstance(options, dict)
            or len(options) < 2
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())
        ):
            self._invalid(f"{location}: 'Options' must map letters to texts (at least two), got {_describe(options)}")
            return None
        answer = answer.strip() if isinstance(answer, str) else answer
        if answer not in options:
            self._invalid(f"{location}: 'Answer' {_describe(answer)} is not one of the options {', '.join(options)}")
            return None
        question_type = raw.get("type")
        question_type = question_type if isinstance(question_type, str) and question_type else "unspecified"
        return MultipleChoiceQuestion(text, tuple(options.items()), answer, question_type)
