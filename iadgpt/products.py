"""Products: a named reference set for inspection on a line, stored once and reused for every part.

A product is a folder `<products>/<name>/` holding its reference images (copied in, so the product
does not depend on where they came from), and `product.json`: the model it was made for (path and
`checkpoint_digest`), the question, and after `calibrate` the decision threshold with its validation
figures (`calibration/scores.csv`, `calibration/histogram.png`). The products folder is `--products
DIR`, else `$IADGPT_PRODUCTS`, else `./products`.

Writes are atomic: a product is assembled in a hidden temporary folder and renamed into place, and a
calibration is written beside `product.json` and renamed over it. Writers take the store's lock
(`.lock`, an advisory `flock`), so the CLI and a running service never interleave their writes. A
process killed mid-write can leave a hidden staging folder behind, or (killed between the two renames
that replace a product) the old product moved aside; `ProductStore.recover`, run before every write
and when the service starts, puts such a product back and deletes the leftovers. So a crash leaves
the old product or the new one, never half of one. Names starting with "." are never products.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data.samples import image_digest, load_image

FORMAT = 1
"""The product.json layout this version writes and reads."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LEFTOVER = re.compile(r"^\.(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})\.(?P<kind>new|old|removed)-[A-Za-z0-9_]+$")
"""The hidden folders a write works in (`tempfile.mkdtemp` names): `.NAME.new-*` is being assembled,
`.NAME.old-*/NAME` is the version being replaced, `.NAME.removed-*/NAME` is being deleted."""
LOCK_FILE = ".lock"
ENVIRONMENT = "IADGPT_PRODUCTS"


class ProductError(ValueError):
    """A product that cannot be made, found or used as asked; the message says why."""


class ProductNotFound(ProductError):
    """No product of that name."""


class ProductExists(ProductError):
    """A product of that name exists and replacing it was not asked for."""


def products_folder(given: str | os.PathLike | None = None) -> Path:
    """`given`, else $IADGPT_PRODUCTS, else ./products."""
    return Path(given or os.environ.get(ENVIRONMENT) or "products").expanduser()


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise ProductError(f"product name {name!r}: use letters, digits, '.', '_' and '-' (1-100 characters, "
                           "starting with a letter or digit); no path separators")
    return name


def checkpoint_digest(path: str | os.PathLike, chunk: int = 1 << 16, samples: int = 16) -> str:
    """A digest of a checkpoint folder's weights (`*.safetensors`): per file its name, size, header
    (tensor names, shapes, offsets) and `samples` evenly spaced chunks of its data.

    Sampled rather than whole, so that a 15 GB checkpoint is identified in well under a second:
    retraining or fine-tuning changes every sampled chunk, while an edit of a few bytes between them
    would go unseen.
    """
    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ProductError(f"{folder}: no *.safetensors weights to identify the model by")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as stream:
            header_length = int.from_bytes(stream.read(8), "little")
            digest.update(stream.read(header_length))
            data_start = 8 + header_length
            span = max(size - data_start - chunk, 0)
            for i in range(samples + 1):
                stream.seek(data_start + span * i // samples)
                digest.update(stream.read(chunk))
    return digest.hexdigest()


@dataclass
class Calibration:
    """The decision threshold of a product and how it was set."""

    threshold: float
    """A part is called defective when its score is >= this."""
    method: str
    """"target_fpr" (normals only: the false-alarm rate at most `target_fpr`) or "f1_max" (with defects)."""
    target_fpr: float | None
    normals: int
    """Held-out normal images scored."""
    defects: int
    """Defective images scored (0 without --defects)."""
    false_alarm_rate: float
    """Share of the held-out normals at or above the threshold."""
    miss_rate: float | None
    """Share of the defective images below the threshold (None without defects)."""
    score_quantiles: dict[str, float] = field(default_factory=dict)
    """Normal scores' min, median, 99th percentile and max."""
    files: dict[str, str] = field(default_factory=dict)
    """Per-image scores (CSV) and the score histogram (PNG), relative to the product folder."""


@dataclass
class Product:
    """A stored reference set (see the module docstring)."""

    name: str
    folder: Path
    model: str
    """The checkpoint it was made for, as given (a local folder is stored absolute)."""
    model_digest: str
    normals: list[str]
    """Reference images, relative to `folder`."""
    abnormal: list[str]
    question: str
    created: str
    calibration: Calibration | None = None

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold if self.calibration else None

    def normal_images(self) -> list[Image.Image]:
        return [load_image(self.folder / path) for path in self.normals]

    def abnormal_images(self) -> list[Image.Image]:
        return [load_image(self.folder / path) for path in self.abnormal]

    def check_model(self, model: str | os.PathLike) -> None:
        """Refuse weights other than the product's (compared by `checkpoint_digest`)."""
        if checkpoint_digest(model) != self.model_digest:
            raise ProductError(f"product {self.name!r} was made with the weights of {self.model}; {model} holds "
                               "other weights. Re-create the product for this model (iadgpt product add ... "
                               "--overwrite) and calibrate it again: scores of other weights are not comparable.")

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("folder")
        return {"format": FORMAT, **data}


class ProductStore:
    """The products of one folder."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = products_folder(folder)

    def path(self, name: str) -> Path:
        return self.folder / check_name(name)

    @contextlib.contextmanager
    def _writing(self):
        """Hold the store's write lock, with the leftovers of killed writers cleared first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            self._recover_locked()
            yield

    def recover(self) -> list[str]:
        """Undo what killed writers left: a product moved aside by an unfinished replacement goes back
        in place, staging and retired folders are deleted. Does nothing while another process
        writes (it holds the lock, and its folders are not leftovers). Returns what it did."""
        if not self.folder.is_dir():
            return []
        try:
            lock = open(self.folder / LOCK_FILE, "a")
        except OSError:  # a store we may only read: nobody writes here through us, nothing to undo
            return []
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            return self._recover_locked()

    def _recover_locked(self) -> list[str]:
        done = []
        for parent in [self.folder, *(self.folder / name for name in self.names())]:
            for leftover in sorted(parent.iterdir()):
                match = LEFTOVER.match(leftover.name)
                if match is None or not leftover.is_dir():
                    if leftover.name == ".product.json.new":  # product.json is only replaced by a rename
                        leftover.unlink()
                        done.append(f"deleted {leftover}")
                    continue
                name, kind = match["name"], match["kind"]
                if kind == "old" and (leftover / name).exists() and not (parent / name).exists():
                    os.replace(leftover / name, parent / name)  # its replacement never arrived
                    done.append(f"restored {parent / name}")
                shutil.rmtree(leftover)
                done.append(f"deleted {leftover}")
        return done

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and NAME.match(p.name))

    def get(self, name: str) -> Product:
        folder = self.path(name)
        if not folder.is_dir():
            known = ", ".join(self.names()) or "none"
            raise ProductNotFound(f"no product {name!r} in {self.folder} (products there: {known})")
        manifest = folder / "product.json"
        if not manifest.is_file():
            raise ProductError(f"{folder} has no product.json: not a product folder")
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise ProductError(f"{manifest} is not valid JSON: {err}") from err
        if data.get("format") != FORMAT:
            raise ProductError(f"{manifest} was written in product format {data.get('format')!r}; this iadgpt reads "
                               f"format {FORMAT}. Re-create the product with this version.")
        data.pop("format")
        calibration = data.pop("calibration", None)
        return Product(folder=folder, calibration=Calibration(**calibration) if calibration else None, **data)

    def list(self) -> list[Product]:
        return [self.get(name) for name in self.names()]

    def add(self, name: str, model: str | os.PathLike, normals: list, abnormal: list = (),
            question: str | None = None, overwrite: bool = False) -> Product:
        """Store a product: its reference images (paths, or (name, PIL image) pairs) copied in, the
        model's digest, the question."""
        target = self.path(name)
        if target.exists() and not overwrite:  # refused before the work; checked again under the lock
            raise ProductExists(f"product {name!r} already exists in {self.folder}: pass --overwrite to replace it")
        if not normals:
            raise ProductError("a product needs at least one normal reference image")
        digest = checkpoint_digest(model)
        model_name = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else str(model)
        with self._writing():
            if target.exists() and not overwrite:
                raise ProductExists(f"product {name!r} already exists in {self.folder}: pass --overwrite to replace "
                                    "it")
            return self._add_locked(name, target, model_name, digest, normals, abnormal, question)

    def _add_locked(self, name, target, model_name, digest, normals, abnormal, question) -> Product:
        from .model.settings import DetectionQuestion

        staging = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=self.folder))
        try:
            stored = {}
            for kind, paths in (("normals", normals), ("abnormal", abnormal)):
                stored[kind] = []
                for index, item in enumerate(paths):
                    # a corrupt image is refused here, naming the file
                    path, image = item if isinstance(item, tuple) else (item, load_image(item))
                    relative = f"{kind}/{index:03d}_{Path(path).stem}.png"
                    (staging / kind).mkdir(exist_ok=True)
                    image.save(staging / relative)
                    stored[kind].append(relative)
            product = Product(name=name, folder=target, model=model_name, model_digest=digest,
                              normals=stored["normals"], abnormal=stored["abnormal"],
                              question=question or DetectionQuestion().text,
                              created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            (staging / "product.json").write_text(json.dumps(product.to_json(), indent=2))
            self._replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return product

    def remove(self, name: str) -> None:
        with self._writing():
            target = self.get(name).folder
            retired = Path(tempfile.mkdtemp(prefix=f".{name}.removed-", dir=self.folder))
            os.replace(target, retired / name)  # gone from the store at once; the files follow
            shutil.rmtree(retired, ignore_errors=True)

    def save_calibration(self, product: Product, calibration: Calibration, rows: list[tuple[str, str, float]],
                         histogram: Image.Image) -> Product:
        """Write the calibration files, then product.json with the threshold, each by a rename."""
        files = {"scores": "calibration/scores.csv", "histogram": "calibration/histogram.png"}
        with self._writing():
            staging = Path(tempfile.mkdtemp(prefix=".calibration.new-", dir=product.folder))
            try:
                with (staging / "scores.csv").open("w", encoding="utf-8") as stream:
                    stream.write("path,kind,score\n")
                    stream.writelines(f"{path},{kind},{score:.6f}\n" for path, kind, score in rows)
                histogram.save(staging / "histogram.png")
                self._replace(staging, product.folder / "calibration")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            calibration.files = files
            product.calibration = calibration
            manifest = product.folder / "product.json"
            temporary = manifest.with_name(".product.json.new")
            temporary.write_text(json.dumps(product.to_json(), indent=2))
            os.replace(temporary, manifest)
            return product

    def _replace(self, staging: Path, target: Path) -> None:
        """Put the finished `staging` folder at `target`, replacing what is there (by renames only)."""
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)


# -- calibration ---------------------------------------------------------------------------------
def threshold_at_false_alarm_rate(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold at which at most floor(target_fpr * n) of the normal scores are >= it:
    just above the (floor(target_fpr * n) + 1)-th largest score."""
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(target_fpr * len(scores) + 1e-9))
    return float(np.nextafter(scores[allowed], np.inf))


def threshold_at_f1_max(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    """The threshold of the largest F1 (defective = positive, called when score >= threshold) over the
    candidate thresholds at every score; the highest such threshold on ties (fewer false alarms)."""
    scores = np.concatenate([normal_scores, defect_scores]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(normal_scores)), np.ones(len(defect_scores))])
    best, best_f1 = None, -1.0
    for candidate in np.unique(scores):
        called = scores >= candidate
        true_positive = float((called & (labels == 1)).sum())
        f1 = 2 * true_positive / (called.sum() + labels.sum())
        if f1 >= best_f1:
            best, best_f1 = float(candidate), f1
    return best


def minimum_normals(target_fpr: float) -> int:
    """Normals needed to measure a false-alarm rate of `target_fpr`: at least one in 1 / target_fpr."""
    return int(np.ceil(1.0 / target_fpr - 1e-9))


def require_enough_normals(count: int, target_fpr: float, with_defects: bool) -> None:
    """Refuse a calibration at `target_fpr` on fewer normals than it takes to measure (F1-max, with
    defects, needs no such count)."""
    if not with_defects and count < minimum_normals(target_fpr):
        raise ProductError(f"{count} held-out normal image(s) cannot show a false-alarm rate of {target_fpr:g}: it "
                           f"takes at least {minimum_normals(target_fpr)}. Add normals, raise --target-fpr, or give "
                           "--defects to calibrate at F1-max.")


def calibrate(normal_scores: np.ndarray, defect_scores: np.ndarray | None = None,
              target_fpr: float = 0.01) -> Calibration:
    """The threshold from held-out scores: at `target_fpr` on the normals, or at F1-max with defects."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    if not 0.0 < target_fpr < 1.0:
        raise ProductError(f"--target-fpr {target_fpr}: a false-alarm rate is in (0, 1)")
    if defect_scores is not None and len(defect_scores):
        defect_scores = np.asarray(defect_scores, dtype=np.float64)
        threshold, method = threshold_at_f1_max(normal_scores, defect_scores), "f1_max"
        miss = float((defect_scores < threshold).mean())
    else:
        require_enough_normals(len(normal_scores), target_fpr, with_defects=False)
        threshold, method, miss, defect_scores = threshold_at_false_alarm_rate(normal_scores, target_fpr), \
            "target_fpr", None, np.zeros(0)
    quantiles = {name: float(np.quantile(normal_scores, q)) for name, q in
                 (("min", 0.0), ("median", 0.5), ("p99", 0.99), ("max", 1.0))}
    return Calibration(threshold=threshold, method=method, target_fpr=target_fpr if method == "target_fpr" else None,
                       normals=len(normal_scores), defects=len(defect_scores),
                       false_alarm_rate=float((normal_scores >= threshold).mean()), miss_rate=miss,
                       score_quantiles=quantiles)


def score_histogram(normal_scores, defect_scores, threshold: float, bins: int = 40,
                    size: tuple[int, int] = (480, 240)) -> Image.Image:
    """A small PNG-ready histogram of the scores in [0, 1]: normals green, defects red (drawn on top,
    half-transparent), the threshold a black line."""
    width, height = size
    margin = 20
    image = Image.new("RGBA", size, "white")
    draw = ImageDraw.Draw(image, "RGBA")
    counts = [np.histogram(np.asarray(s, dtype=np.float64), bins=bins, range=(0.0, 1.0))[0]
              for s in (normal_scores, defect_scores if defect_scores is not None else [])]
    tallest = max(1, *(int(c.max()) if len(c) else 0 for c in counts))
    bar = (width - 2 * margin) / bins
    for values, colour in zip(counts, ((40, 160, 60, 200), (200, 40, 40, 140))):
        for i, count in enumerate(values):
            if count:
                top = height - margin - (height - 2 * margin) * count / tallest
                draw.rectangle([margin + i * bar, top, margin + (i + 1) * bar - 1, height - margin], fill=colour)
    x = margin + threshold * (width - 2 * margin)
    draw.line([x, margin / 2, x, height - margin], fill=(0, 0, 0, 255), width=2)
    draw.line([margin, height - margin, width - margin, height - margin], fill=(0, 0, 0, 255))
    draw.text((margin, height - margin + 4), "0", fill="black")
    draw.text((width - margin - 6, height - margin + 4), "1", fill="black")
    draw.text((min(x + 4, width - 120), 2), f"threshold {threshold:.3f}", fill="black")
    return image.convert("RGB")


def calibrate_product(store: ProductStore, product: Product, inspector, normals: dict[str, Image.Image],
                      defects: dict[str, Image.Image] | None = None, target_fpr: float = 0.01) -> Calibration:
    """Score held-out images (by name) with `inspector` against the product's references, set the
    threshold (`calibrate`) and store it with its files. Refuses images that are references and,
    without defects, fewer normals than the rate needs, before any scoring."""
    defects = defects or {}
    require_enough_normals(len(normals), target_fpr, with_defects=bool(defects))
    references, abnormal = product.normal_images(), product.abnormal_images()
    overlap = overlapping_references([*references, *abnormal], {**normals, **defects})
    if overlap:
        raise ProductError(f"{len(overlap)} calibration image(s) are the product's own references, which would make "
                           f"the false-alarm rate look better than it is: {', '.join(overlap[:5])}")
    names = [*normals, *defects]
    images = [*normals.values(), *defects.values()]
    results = inspector.inspect(images, [references] * len(images), [abnormal] * len(images))
    scores = dict(zip(names, (r.score for r in results)))
    normal_scores, defect_scores = [scores[n] for n in normals], [scores[n] for n in defects]
    calibration = calibrate(normal_scores, defect_scores or None, target_fpr)
    rows = [(n, "normal", scores[n]) for n in normals] + [(n, "defect", scores[n]) for n in defects]
    store.save_calibration(product, calibration, rows, score_histogram(normal_scores, defect_scores,
                                                                        calibration.threshold))
    return calibration


def overlapping_references(references: list[Image.Image], images: dict[str, Image.Image]) -> list[str]:
    """The names among `images` whose content is one of the `references`."""
    digests = {image_digest(image) for image in references}
    return [name for name, image in images.items() if image_digest(image) in digests]


__all__ = ["Calibration", "Product", "ProductError", "ProductStore", "calibrate", "calibrate_product",
           "checkpoint_digest",
           "minimum_normals", "overlapping_references", "require_enough_normals", "products_folder", "score_histogram",
           "threshold_at_f1_max", "threshold_at_false_alarm_rate"]
