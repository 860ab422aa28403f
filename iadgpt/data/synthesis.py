"""Defect synthesis: CutPaste patches and scars, and DRAEM-style Perlin-noise texture blends.

Why it exists: real anomalous images are scarce, and the stage-2 proxy tasks (odd-one-out,
difference regions, irregular region) and the synthetic factory need many anomalies with exact
masks. Each function here turns a normal image into an anomalous one and returns the mask of what
it did, so a pixel-level loss can be trained on it.

Contract shared by every synthesis function:
  * input: a PIL image (any mode; it is read as RGB) or an HxWx3 uint8 array;
  * output: `(image, mask)`, an RGB PIL image of the same size and a bool HxW array;
  * the mask is exactly the set of pixels whose RGB value changed: every pixel outside it is
    bit-identical to the input and every pixel inside it differs. A pasted region that happens to
    reproduce the original values (a flat background pasted on the same flat background) is not
    a defect anyone could see, so it is not in the mask either;
  * deterministic: the randomness comes only from `rng`, a `numpy.random.Generator` or an int
    seed, so the same seed gives the same image and mask;
  * numpy-vectorised (no per-pixel Python loops), so the factory can make hundreds of images/s.

A synthesis may retry a few placements (`max_attempts`) until enough of its region really
changed (`min_changed_fraction`); the retries consume the same generator, so they stay
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "as_generator",
    "color_jitter",
    "cutpaste_patch",
    "cutpaste_scar",
    "foreground_mask",
    "fractal_perlin_noise",
    "perlin_blend",
    "perlin_noise",
]

ImageLike = Image.Image | np.ndarray
RandomSource = np.random.Generator | int


def as_generator(rng: RandomSource | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is, so callers can chain draws) or an int seed.

    `None` is refused: an unseeded synthesis would silently break the reproducibility that every
    caller of this module relies on.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _rgb_array(image: ImageLike) -> np.ndarray:
    """The image as a fresh HxWx3 uint8 array (PIL images of any mode are converted to RGB)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {array.shape} dtype {array.dtype}")
    return array.copy()


def _bool_mask(mask: np.ndarray | None, shape: tuple[int, int], what: str) -> np.ndarray | None:
    """A caller's mask as a bool array of the image's HxW shape (None stays None)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{what} has shape {mask.shape}, the image is {shape}")
    return mask.astype(bool)


def _quantise(values: np.ndarray) -> np.ndarray:
    """Float RGB values to uint8, rounded (not truncated) so a no-op blend leaves values unchanged."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _changed(original: np.ndarray, result: np.ndarray) -> np.ndarray:
    """The bool HxW set of pixels whose RGB value differs between two uint8 images."""
    return np.any(original != result, axis=2)


def _check_range(name: str, value: Sequence[float], low: float = 0.0) -> None:
    """Refuse a (low, high) parameter that is not a pair, is reversed, or leaves its domain."""
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be a (low, high) pair with {low} <= low <= high, got {tuple(value)!r}")


# --------------------------------------------------------------------------------------------------
# Colour jitter


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Randomly change brightness, contrast, saturation and hue of an (..., 3) float RGB array.

    The numpy counterpart of torchvision's `ColorJitter(s, s, s, s)` used by CutPaste: brightness,
    contrast and saturation factors are drawn from [1 - s, 1 + s] and the hue is rotated by up to
    ±s of the colour circle (a rotation of the chroma plane in YIQ space, exact enough for a
    defect and free of per-pixel HSV conversions). Returns floats, not clipped.
    """
    if strength <= 0:
        return pixels.astype(np.float32, copy=True)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    brightness, contrast, saturation = rng.uniform(low, high, 3)
    hue_turns = rng.uniform(-min(strength, 0.5), min(strength, 0.5))
    out = pixels.astype(np.float32) * brightness
    grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = (out - grey.mean()) * contrast + grey.mean()
    grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = grey[..., None] + (out - grey[..., None]) * saturation
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
    angle = 2.0 * math.pi * hue_turns
    rotation = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]], dtype=np.float32
    )
    transform = np.linalg.inv(to_yiq) @ rotation @ to_yiq
    return out @ transform.T.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: smooth (C2) interpolation between lattice cells."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], resolution: tuple[int, int], rng: RandomSource
) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape`, with `resolution` = (rows, columns) lattice cells.

    Vectorised over all pixels at once: a random unit gradient per lattice corner, dot products
    with the offsets to the four surrounding corners, blended with the quintic fade. Unlike the
    DRAEM reference, the shape need not be a multiple of the resolution. Values lie roughly in
    [-1, 1] (scaled by sqrt 2), zero at every lattice point. Returns float32 HxW.
    """
    rng = as_generator(rng)
    height, width = int(shape[0]), int(shape[1])
    rows, cols = max(1, int(resolution[0])), max(1, int(resolution[1]))
    angles = rng.uniform(0.0, 2.0 * math.pi, (rows + 1, cols + 1))
    grad_x, grad_y = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5) * (rows / height)
    x = (np.arange(width, dtype=np.float32) + 0.5) * (cols / width)
    y0 = np.minimum(y.astype(np.int64), rows - 1)
    x0 = np.minimum(x.astype(np.int64), cols - 1)
    fy = (y - y0.astype(np.float32))[:, None]
    fx = (x - x0.astype(np.float32))[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # Two 1-D takes (rows, then columns) upsample the lattice: much cheaper than one 2-D gather.
        gradient_x = grad_x.take(y0 + dy, axis=0).take(x0 + dx, axis=1)
        gradient_y = grad_y.take(y0 + dy, axis=0).take(x0 + dx, axis=1)
        return gradient_x * (fx - dx) + gradient_y * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    c00, c01, c10, c11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = c00 + u * (c01 - c00)
    bottom = c10 + u * (c11 - c10)
    return (top + v * (bottom - top)) * np.float32(math.sqrt(2.0))


def fractal_perlin_noise(
    shape: tuple[int, int],
    resolution: tuple[int, int],
    rng: RandomSource,
    octaves: int = 3,
    persistence: float = 0.5,
) -> np.ndarray:
    """A sum of Perlin octaves (resolution doubling, amplitude times `persistence` each octave).

    Used for natural-looking materials (wood grain turbulence, leather) where a single octave looks
    too smooth. Normalised by the total amplitude so values stay roughly in [-1, 1].
    """
    rng = as_generator(rng)
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += amplitude * perlin_noise(shape, (resolution[0] * scale, resolution[1] * scale), rng)
        norm += amplitude
        amplitude *= persistence
    return total / norm


# --------------------------------------------------------------------------------------------------
# Foreground estimate


def _box_mean(mask: np.ndarray, radius: int) -> np.ndarray:
    """Mean of a bool mask over a (2r+1)^2 box around each pixel (edge-clamped), via summed areas."""
    if radius <= 0:
        return mask.astype(np.float32)
    padded = np.pad(mask.astype(np.float32), radius, mode="edge")
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    size = 2 * radius + 1
    h, w = mask.shape
    total = integral[size : size + h, size : size + w] - integral[:h, size : size + w]
    total = total - integral[size : size + h, :w] + integral[:h, :w]
    return total / float(size * size)


def foreground_mask(image: ImageLike, threshold: float = 40.0, border: int = 2) -> np.ndarray:
    """An APPROXIMATE estimate of where the object is: pixels that differ from the border colour.

    Meant for object-centred product photos (a part on a plain tray or belt, as in MVTec-AD's
    object categories) so that synthetic defects land on the part, not on the background. The
    background colour is taken as the per-channel median of a `border`-pixel frame; a pixel is
    foreground when its largest channel difference from it exceeds `threshold`, and a 5x5
    majority vote removes speckle and fills pin-holes. Known limits, by design of a one-line
    heuristic: a part that touches the border or has the background's colour is partly missed,
    shadows count as foreground. When the border itself is not plain (a texture filling the whole
    frame, the other MVTec-AD kind) the whole image is the object and every pixel is returned.
    Pass a real mask to the synthesis functions whenever one is known.
    """
    pixels = _rgb_array(image).astype(np.float32)
    height, width = pixels.shape[:2]
    border = max(1, min(int(border), height // 2, width // 2))
    frame = np.concatenate(
        [
            pixels[:border].reshape(-1, 3),
            pixels[-border:].reshape(-1, 3),
            pixels[:, :border].reshape(-1, 3),
            pixels[:, -border:].reshape(-1, 3),
        ]
    )
    background = np.median(frame, axis=0)
    frame_spread = np.abs(frame - background).max(axis=1)
    if np.mean(frame_spread > threshold) > 0.25:
        return np.ones((height, width), dtype=bool)
    differs = np.abs(pixels - background).max(axis=2) > threshold
    return _box_mean(differs, 2) > 0.5


# --------------------------------------------------------------------------------------------------
# CutPaste


def _foreground_point(
    rng: np.random.Generator, foreground: np.ndarray | None, shape: tuple[int, int]
) -> tuple[float, float]:
    """A random (y, x) pixel centre, on the foreground when one is given and non-empty."""
    if foreground is not None and foreground.any():
        ys, xs = np.nonzero(foreground)
        pick = rng.integers(len(ys))
        return float(ys[pick]) + 0.5, float(xs[pick]) + 0.5
    return float(rng.uniform(0, shape[0])), float(rng.uniform(0, shape[1]))


def _accept(changed_in_region: int, region: int, min_changed_fraction: float) -> bool:
    return region > 0 and changed_in_region >= max(1, min_changed_fraction * region)


def cutpaste_patch(
    image: ImageLike,
    rng: RandomSource,
    *,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    color_jitter_strength: float = 0.1,
    foreground: np.ndarray | None = None,
    min_changed_fraction: float = 0.5,
    max_attempts: int = 10,
) -> tuple[Image.Image, np.ndarray]:
    """CutPaste (Li et al., CVPR 2021): copy a rectangle of the image and paste it elsewhere.

    The rectangle's area is `area_ratio` of the image (uniform) and its width/height ratio is
    log-uniform in `aspect_ratio`, as in the paper; the patch's colours are jittered with
    `color_jitter_strength` (0 disables it). The patch is cut anywhere; when `foreground` is given
    its paste centre is a foreground pixel, so the irregularity lands on the object. The result
    breaks the local continuity of the image, which is what a model must learn to spot.
    Returns (RGB image, bool mask of the changed pixels).
    """
    _check_range("area_ratio", area_ratio)
    _check_range("aspect_ratio", aspect_ratio, low=1e-3)
    rng = as_generator(rng)
    original = _rgb_array(image)
    height, width = original.shape[:2]
    foreground = _bool_mask(foreground, (height, width), "foreground")
    log_low, log_high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    result, region = original, np.zeros((height, width), dtype=bool)
    for _ in range(max(1, max_attempts)):
        area = rng.uniform(*area_ratio) * height * width
        aspect = math.exp(rng.uniform(log_low, log_high))
        patch_h = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
        patch_w = int(np.clip(round(math.sqrt(area * aspect)), 1, width))
        src_y = int(rng.integers(0, height - patch_h + 1))
        src_x = int(rng.integers(0, width - patch_w + 1))
        centre_y, centre_x = _foreground_point(rng, foreground, (height, width))
        dst_y = int(np.clip(round(centre_y - patch_h / 2), 0, height - patch_h))
        dst_x = int(np.clip(round(centre_x - patch_w / 2), 0, width - patch_w))
        patch = original[src_y : src_y + patch_h, src_x : src_x + patch_w]
        patch = _quantise(color_jitter(patch, rng, color_jitter_strength))
        result = original.copy()
        result[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = patch
        region = np.zeros((height, width), dtype=bool)
        region[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = True
        if _accept(int((_changed(original, result) & region).sum()), int(region.sum()), min_changed_fraction):
            break
    mask = _changed(original, result)
    return Image.fromarray(result), mask


def cutpaste_scar(
    image: ImageLike,
    rng: RandomSource,
    *,
    width_fraction: tuple[float, float] = (0.015, 0.05),
    length_fraction: tuple[float, float] = (0.12, 0.35),
    rotation_degrees: tuple[float, float] = (-45.0, 45.0),
    color_jitter_strength: float = 0.1,
    foreground: np.ndarray | None = None,
    min_changed_fraction: float = 0.5,
    max_attempts: int = 10,
) -> tuple[Image.Image, np.ndarray]:
    """CutPaste-Scar: cut a thin, long strip, rotate it, jitter its colour and paste it elsewhere.

    The paper's scar is 2-16 px wide and 10-25 px long on 256 px images; here both are fractions
    of the image's shorter side (at least 2 px wide) so the scar stays visible at 64-128 px.
    The strip is cut axis-aligned (long side vertical) and pasted rotated by a uniform angle in
    `rotation_degrees`, sampled nearest-neighbour over the whole destination at once. When
    `foreground` is given the scar's centre lies on the foreground. Returns (RGB image, bool mask
    of the changed pixels).
    """
    _check_range("width_fraction", width_fraction)
    _check_range("length_fraction", length_fraction)
    _check_range("rotation_degrees", rotation_degrees, low=-360.0)
    rng = as_generator(rng)
    original = _rgb_array(image)
    height, width = original.shape[:2]
    foreground = _bool_mask(foreground, (height, width), "foreground")
    side = min(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    result, region = original, np.zeros((height, width), dtype=bool)
    for _ in range(max(1, max_attempts)):
        scar_w = max(2.0, rng.uniform(*width_fraction) * side)
        scar_l = min(float(height), max(scar_w + 1, rng.uniform(*length_fraction) * side))
        angle = math.radians(rng.uniform(*rotation_degrees))
        # Source strip: axis-aligned, scar_l tall and scar_w wide, fully inside the image.
        src_cy = rng.uniform(scar_l / 2, height - scar_l / 2)
        src_cx = rng.uniform(scar_w / 2, width - scar_w / 2) if width > scar_w else width / 2
        dst_cy, dst_cx = _foreground_point(rng, foreground, (height, width))
        # Destination pixel -> strip coordinates (along = the long axis, across = the short one).
        dy, dx = ys - dst_cy, xs - dst_cx
        along = dy * math.cos(angle) + dx * math.sin(angle)
        across = -dy * math.sin(angle) + dx * math.cos(angle)
        region = (np.abs(along) <= scar_l / 2) & (np.abs(across) <= scar_w / 2)
        if not region.any():
            continue
        src_y = np.clip(np.floor(src_cy + along[region]).astype(np.int64), 0, height - 1)
        src_x = np.clip(np.floor(src_cx + across[region]).astype(np.int64), 0, width - 1)
        strip = color_jitter(original[src_y, src_x], rng, color_jitter_strength)
        result = original.copy()
        result[region] = _quantise(strip)
        if _accept(int((_changed(original, result) & region).sum()), int(region.sum()), min_changed_fraction):
            break
    mask = _changed(original, result)
    return Image.fromarray(result), mask


# --------------------------------------------------------------------------------------------------
# DRAEM-style Perlin blend


def _default_scale_exponents(height: int, width: int) -> tuple[int, int]:
    """DRAEM draws lattice resolutions 2^0..2^6 at 256 px, i.e. cells of at least 4 px: keep that."""
    return 0, max(0, int(math.log2(max(1, min(height, width) // 4))))


def perlin_blend(
    image: ImageLike,
    texture: ImageLike,
    rng: RandomSource,
    foreground: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    opacity: tuple[float, float] = (0.2, 1.0),
    scale_exponents: tuple[int, int] | None = None,
    min_area_fraction: float = 0.002,
    max_attempts: int = 10,
) -> tuple[Image.Image, np.ndarray]:
    """DRAEM (Zavrtanik et al., ICCV 2021): blend a foreign texture in through a Perlin-noise mask.

    A Perlin noise field with lattice resolution 2^a x 2^b (a, b uniform in `scale_exponents`) is
    thresholded at `threshold` into irregular blobs; the blobs are intersected with the object's
    `foreground` when given (so the anomaly sits on the part, not the tray), and inside them the
    image becomes `opacity * texture + (1 - opacity) * image` with one random opacity from
    `opacity` (DRAEM's beta = 1 - opacity in [0, 0.8]). `texture` is resized to the image (and
    randomly flipped/rotated by multiples of 90 degrees for variety). Blob draws are retried
    until at least `min_area_fraction` of the image changes. Returns (RGB image, bool mask of the
    changed pixels), the mask a subset of `foreground`.
    """
    _check_range("opacity", opacity)
    rng = as_generator(rng)
    original = _rgb_array(image)
    height, width = original.shape[:2]
    foreground = _bool_mask(foreground, (height, width), "foreground")
    tex = _rgb_array(texture)
    if tex.shape[:2] != (height, width):
        tex = np.asarray(Image.fromarray(tex).resize((width, height), Image.BILINEAR), dtype=np.uint8)
    tex = np.rot90(tex, int(rng.integers(4))) if height == width else tex
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    tex = tex.astype(np.float32)
    low_exp, high_exp = scale_exponents or _default_scale_exponents(height, width)
    min_area = max(1, int(min_area_fraction * height * width))
    result = original
    for _ in range(max(1, max_attempts)):
        res_y = 2 ** int(rng.integers(low_exp, high_exp + 1))
        res_x = 2 ** int(rng.integers(low_exp, high_exp + 1))
        region = perlin_noise((height, width), (res_y, res_x), rng) > threshold
        if foreground is not None:
            region &= foreground
        alpha = float(rng.uniform(*opacity))
        blended = alpha * tex[region] + (1.0 - alpha) * original[region].astype(np.float32)
        result = original.copy()
        result[region] = _quantise(blended)
        if int(_changed(original, result).sum()) >= min_area:
            break
    mask = _changed(original, result)
    return Image.fromarray(result), mask

