"""The typed sample every dataset reader yields, and the only places where images are decoded.

Readers never open an image: they only find paths, so listing a dataset of 150k images costs a
directory walk or one metadata file, not 150k decodes. Decoding happens here, on demand, and every
way it can go wrong (missing file, undecodable or truncated bytes, a mask of the wrong size, a path
that leaves the dataset) becomes a `DataError` whose message names the file, so a build that stops
on bad data says which file to look at instead of a bare PIL traceback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "LoadedSample",
    "NORMAL_DEFECT_TYPE",
    "SPLITS",
    "Sample",
    "Split",
    "load_image",
    "load_mask",
    "load_sample",
    "resolve_under_root",
]

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

NORMAL_DEFECT_TYPE = "good"
"""The defect type of every normal sample, whatever the source layout calls it (MVTec-AD's folder
name), so that code downstream needs one test for "normal", not one per dataset."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""Suffixes (compared lower-cased) that directory-scanning readers treat as images; anything else in
an image folder (.DS_Store, Thumbs.db, README) is ignored rather than failing later at decode."""


class DataError(ValueError):
    """Bad input data: the message names the offending file (and line or record where there is one).

    A subclass of ValueError so callers that already guard against bad values keep working, while
    builders that want to skip bad samples can catch exactly this and nothing else.
    """


@dataclass(frozen=True)
class Sample:
    """One image of an anomaly-detection dataset, as paths only (nothing is decoded).

    Frozen so samples can be shared between builders, put in sets and used as dict keys (e.g. to
    prove that no benchmark test image leaks into training records).
    """

    image_path: Path
    category: str
    is_anomalous: bool
    defect_type: str
    """`NORMAL_DEFECT_TYPE` ("good") exactly when the sample is normal."""
    mask_path: Path | None = None
    """Pixel ground truth; None for normal images and for anomalous ones whose layout has no mask."""
    split: Split = "test"

    def __post_init__(self) -> None:
        # Readers build Samples from user data; checking the invariants here turns a reader bug or
        # an inconsistent annotation into an error at the source, not a wrong label in training.
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if self.split not in SPLITS:
            raise ValueError(f"{self.image_path}: split must be one of {SPLITS}, got {self.split!r}")
        if not self.category:
            raise ValueError(f"{self.image_path}: empty category")
        if self.is_anomalous == (self.defect_type == NORMAL_DEFECT_TYPE):
            raise ValueError(
                f"{self.image_path}: is_anomalous={self.is_anomalous} contradicts defect_type "
                f"{self.defect_type!r} (normal samples, and only they, have defect_type {NORMAL_DEFECT_TYPE!r})"
            )

    @property
    def label(self) -> str:
        """"anomalous" or "normal", the word prompts and reports use."""
        return "anomalous" if self.is_anomalous else "normal"


@dataclass
class LoadedSample:
    """A sample with its pixels: what a builder or evaluator gets from `load_sample`."""

    sample: Sample
    image: Image.Image
    mask: np.ndarray | None
    """Bool array (height, width). All False for a normal image without a mask file; None for an
    anomalous image whose layout has no mask (pixel ground truth unknown, not "no defect")."""


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open and fully decode `path`, turning every failure into a DataError naming it.

    `Image.open` only reads the header: a truncated or corrupt file opens fine and fails later,
    deep inside a training step. Calling `.load()` here makes it fail now, with the file's name.
    (If some other code set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` process-wide, Pillow pads
    truncated images with grey instead of failing; that choice is then the caller's.)
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    try:
        image = Image.open(path)
    except UnidentifiedImageError as error:
        raise DataError(f"{path}: cannot decode {what}: not a readable image file ({error})") from error
    except PermissionError as error:
        raise DataError(f"{path}: cannot read {what}: permission denied") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode {what}: corrupt image ({error})") from error
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        image.close()
        raise DataError(f"{path}: cannot decode {what}: corrupt or truncated image ({error})") from error
    return image


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8-bit channels.

    Pillow's own convert("RGB") saturates 16-bit greyscale ("I;16", "I") to white above 255, so
    such images are scaled down from the 16-bit range first; float images are clipped to [0, 255].
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike[str], background: tuple[int, int, int] | None = None) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    `background`: the colour an RGBA image is composited on (qwen_vl_utils, which the official MMAD
    script reads images with, uses white); None drops the alpha channel, as Pillow's convert does.
    Raises DataError naming the file when it is missing, not an image, corrupt or truncated.
    """
    image = _open_decoded(Path(path), "image")
    if background is not None and image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return _to_8bit_rgb(image)


def image_digest(image: Image.Image) -> str:
    """A digest of an image's content (mode, size, pixels): a copy or a re-saved lossless file matches."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_mask(path: str | os.PathLike[str], size: tuple[int, int] | None) -> np.ndarray:
    """Decode a ground-truth mask as a bool array of shape (height, width): True = defective.

    Any non-zero value counts as defective, because datasets disagree on the foreground value
    (MVTec-AD writes 255, VisA writes small class ids, MMAD ships RGB masks). `size` is the
    (width, height) of the image the mask belongs to, in PIL's order (`image.size`); a mask of any
    other size raises DataError naming both sizes, because resizing it silently would misplace the
    defect. Pass None only when there is no image to compare with.
    """
    path = Path(path)
    mask = _open_decoded(path, "mask")
    if size is not None and tuple(mask.size) != tuple(size):
        raise DataError(
            f"{path}: mask size {mask.size[0]}x{mask.size[1]} (width x height) differs from its image's "
            f"{size[0]}x{size[1]}"
        )
    if mask.mode in ("RGBA", "LA", "PA"):
        # Alpha is opacity, not annotation: a fully transparent mask would otherwise be all defect.
        mask = mask.convert("RGB") if mask.mode != "LA" else mask.convert("L")
    values = np.asarray(mask)
    if values.ndim == 3:
        return np.any(values != 0, axis=-1)
    return values != 0


def load_sample(sample: Sample) -> LoadedSample:
    """Decode a sample's image and, when there is one, its mask (checked against the image size)."""
    image = load_image(sample.image_path)
    if sample.mask_path is not None:
        try:
            mask = load_mask(sample.mask_path, image.size)
        except DataError as error:
            raise DataError(f"{error} (mask of image {sample.image_path})") from error
    elif not sample.is_anomalous:
        mask = np.zeros((image.height, image.width), dtype=bool)
    else:
        mask = None
    return LoadedSample(sample=sample, image=image, mask=mask)


def _lexically_normal_absolute(path: Path) -> Path:
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def resolve_under_root(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """Join a path taken from metadata (CSV, JSON) to the dataset root, refusing any that leaves it.

    Metadata files come from elsewhere; a row with `../../home/user/.ssh/id_rsa` or `/etc/passwd`
    must not make a builder read (or copy into a training shard) a file outside the dataset. The
    check is on the normalised path, not on symlink targets: a dataset whose category folders are
    symlinks to another disk still works, while `..` and foreign absolute paths are refused. An
    absolute path is accepted when it lies inside the root (also when it reaches the root through
    a symlink). Returns the absolute, normalised path (symlinks kept as written).
    """
    root_path = _lexically_normal_absolute(Path(root))
    relative_path = Path(relative)
    candidate = Path(os.path.normpath(root_path / relative_path))
    if candidate == root_path or root_path in candidate.parents:
        return candidate
    if relative_path.is_absolute():
        real_root = root_path.resolve()
        real_candidate = candidate.resolve()
        if real_candidate == real_root or real_root in real_candidate.parents:
            return candidate
    raise DataError(f"path {str(relative)!r} escapes the dataset root {root_path}")
