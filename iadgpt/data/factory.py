"""A synthetic industrial factory: procedural products with real-looking defects, in MVTec-AD layout.

Why it exists: the quickstart must train and evaluate the whole pipeline on a CPU with no
downloads, and prove that the model learns to inspect *novel* products from a few normal
exemplars. That needs many product categories (so training and held-out categories can be
disjoint), defects with exact masks (for the pixel loss and pixel AUROC), captions (stage 1), and
one defect kind that no single image can reveal.

What it makes, for every category `<cat>` (names like `c003_pill`, index first so they sort by index):
    <out>/<cat>/train/good/000.png ...                normal training images
    <out>/<cat>/test/good/000.png ...                 normal test images
    <out>/<cat>/test/<kind>/000.png ...               anomalous test images, one folder per kind
    <out>/<cat>/ground_truth/<kind>/000_mask.png ...  their masks (0/255, same size)
    <out>/captions.jsonl   one {"image": relative path, "caption": text} line per image
    <out>/images.jsonl     one line per image: category, split, defect kind and class
                           ("normal", "local" or "in_context"), mask path and the attributes drawn
    <out>/factory.json     the parameters, the shared palette, and every category's look and its
                           defect kinds split into "local" and "in_context"

Products. Nine families, each category drawing its own look from (seed, index): objects on a
plain background (`pill`: round/oval tablets and capsules; `chip`: an IC body with pins; `nut`:
hex/square nuts and washers; `items`: several beads or cubes scattered on a tray) and full-frame
textures (`stripes`, `grid` mesh, `wood`, `leather`, `dots`). Normal images of one category vary
naturally: position, rotation, scale, lighting gradient, a small colour shift, sensor noise,
texture phase and noise fields.

Defects. Local kinds, each with a mask of exactly the changed pixels: `scratch`, `hole`,
`missing_piece`, `contamination`, `cutpaste` and `scar` (CutPaste, from `synthesis.py`) and
`texture_blend` (DRAEM-style Perlin blend of a foreign texture). In-context-only kinds, where
the image looks perfectly normal on its own and is a defect only relative to its category's
normal exemplars: `wrong_color` (the product in another palette colour, one that is the normal
colour of other categories), `wrong_count` (`items` categories: one item more or fewer, a count
normal elsewhere), `wrong_pattern` (`stripes`/`grid`/`dots`: another orientation, mesh size or
lattice, normal elsewhere). Every category draws its colour, count and pattern from the same
shared sets, so across categories the in-context defects have the same distribution as normal
images and a model that sees only the query (k = 0) can do no better than chance on them.

Determinism and independence. Every category's look is drawn from a generator seeded by
(seed, category index) alone, and every image from (seed, category index, stream, image index),
so the same seed gives byte-identical files, and category i is the same whether 4 or 400
categories are made (a held-out split can be drawn by index, e.g. `first_category=100`).

Speed. Rendering is numpy-vectorised signed-distance shading at the image size, PNGs are written
with light compression, and categories can be spread over processes (`workers`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .synthesis import cutpaste_patch, cutpaste_scar, fractal_perlin_noise, perlin_blend

__all__ = [
    "BACKGROUNDS",
    "FACTORY_FORMAT",
    "FAMILIES",
    "IN_CONTEXT_KINDS",
    "LOCAL_KINDS",
    "PALETTE",
    "CategorySpec",
    "FactoryResult",
    "Rendering",
    "add_arguments",
    "category_name",
    "category_spec",
    "draw_pose",
    "main",
    "MadeImage",
    "make_image",
    "make_synthetic",
    "render_category_image",
    "run",
]

FACTORY_FORMAT = "iadgpt-synthetic-factory/1"

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (196, 40, 40),
    "orange": (232, 128, 32),
    "yellow": (226, 200, 48),
    "green": (56, 150, 64),
    "teal": (32, 148, 150),
    "blue": (44, 84, 200),
    "purple": (124, 62, 168),
    "pink": (228, 112, 172),
    "brown": (128, 78, 40),
    "white": (226, 226, 220),
    "black": (36, 36, 40),
}
"""Product colours shared by all categories: a category's normal colour and every wrong colour come
from here, so a wrong colour is always some other category's normal colour. The closest pair is
74 RGB units apart, far beyond the per-image colour variation (a few units), so a wrong colour is
unmistakable next to the exemplars."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "dark grey": (58, 58, 62),
    "mid grey": (120, 120, 124),
    "light grey": (190, 190, 186),
    "slate": (52, 64, 80),
    "beige": (200, 188, 160),
}
"""Tray/belt colours behind object families (textures fill the frame and have none)."""

MIN_OBJECT_CONTRAST = 85.0
"""Minimum RGB distance between an object colour and its background: the colours a category may
use (normally or as a wrong colour) are the palette colours at least this far from its background,
so no product, normal or defective, vanishes into its tray."""

OBJECT_FAMILIES = ("pill", "chip", "nut", "items")
TEXTURE_FAMILIES = ("stripes", "grid", "wood", "leather", "dots")
FAMILIES = OBJECT_FAMILIES + TEXTURE_FAMILIES

LOCAL_KINDS = ("scratch", "hole", "missing_piece", "contamination", "cutpaste", "scar", "texture_blend")
IN_CONTEXT_KINDS = ("wrong_color", "wrong_count", "wrong_pattern")
NORMAL_KIND = "good"

COUNT_RANGE = (2, 6)
"""Item counts of `items` categories; a wrong count stays inside this range, so it is normal elsewhere."""

STRIPE_ORIENTATIONS = {"horizontal": 0.0, "rising diagonal": 45.0, "vertical": 90.0, "falling diagonal": 135.0}
GRID_CELLS = {"fine": 0.10, "medium": 0.15, "coarse": 0.22}
DOT_LATTICES = {
    "dense square": ("square", 0.11),
    "sparse square": ("square", 0.17),
    "dense hexagonal": ("hexagonal", 0.11),
    "sparse hexagonal": ("hexagonal", 0.17),
}
PATTERN_CHOICES: dict[str, tuple[str, ...]] = {
    "stripes": tuple(STRIPE_ORIENTATIONS),
    "grid": tuple(GRID_CELLS),
    "dots": tuple(DOT_LATTICES),
}
"""Discrete pattern variants shared by all categories of a family (`wrong_pattern` picks another)."""

CONTAMINANTS: dict[str, tuple[int, int, int]] = {
    "dark oil": (44, 34, 24),
    "rust": (156, 72, 30),
    "dust": (206, 200, 188),
    "black particle": (18, 18, 20),
    "blue fibre": (40, 70, 160),
}

_SPEC_STREAM = 1
_FAMILY_ORDER_STREAM = 2
_FOREIGN_TEXTURE_STREAM = 3


# ==================================================================================================
# Category looks


@dataclass(frozen=True)
class CategorySpec:
    """Everything that defines one product category's look (all of it recorded in factory.json).

    `params` holds the family's geometry as fractions of the image side, so a category looks the
    same at 64 and 256 px. `allowed_colors` are the palette colours that contrast with this
    category's background: its own colour and its possible wrong colours.
    """

    index: int
    name: str
    family: str
    shape: str
    material: str
    surface: str
    color: str
    background: str | None
    structure: str
    allowed_colors: tuple[str, ...]
    local_kinds: tuple[str, ...]
    in_context_kinds: tuple[str, ...]
    pattern: str | None = None
    count: int | None = None
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_texture(self) -> bool:
        return self.family in TEXTURE_FAMILIES

    @property
    def object_noun(self) -> str:
        """What captions call the product ("pill", "surface", "beads")."""
        return "surface" if self.is_texture else self.shape.split()[-1]


def category_name(index: int, family: str) -> str:
    """`c003_pill`: the index first (zero-padded to 3 digits) so names sort by index."""
    return f"c{index:03d}_{family}"


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints: independent streams by construction."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _stream_code(name: str) -> int:
    """A stable int for a stream name (crc32, unlike hash(), does not change between runs)."""
    return zlib.crc32(name.encode("utf-8"))


def _family_for(seed: int, index: int) -> str:
    """Families cycle through a seed-dependent order, so any 9 consecutive categories hold all nine."""
    order = _rng(seed, _FAMILY_ORDER_STREAM).permutation(len(FAMILIES))
    return FAMILIES[int(order[index % len(FAMILIES)])]


def category_spec(seed: int, index: int) -> CategorySpec:
    """The look of category `index` for `seed`: depends on (seed, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and category index must be non-negative, got seed={seed} index={index}")
    family = _family_for(seed, index)
    return _draw_spec(index, family, _rng(seed, index, _SPEC_STREAM))


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _contrasting_colors(background: str | None) -> tuple[str, ...]:
    if background is None:
        return tuple(PALETTE)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    return tuple(
        name
        for name, rgb in PALETTE.items()
        if np.linalg.norm(np.array(rgb, dtype=np.float32) - bg) >= MIN_OBJECT_CONTRAST
    )


def _draw_spec(index: int, family: str, rng: np.random.Generator) -> CategorySpec:
    """Draw one category's look for a family (also used for the foreign textures of texture_blend)."""
    background = None if family in TEXTURE_FAMILIES else _pick(rng, tuple(BACKGROUNDS))
    allowed = _contrasting_colors(background)
    color = _pick(rng, allowed)
    in_context = ["wrong_color"]
    pattern: str | None = None
    count: int | None = None
    params: dict[str, Any] = {}
    if family == "pill":
        shape = _pick(rng, ("round tablet", "oval tablet", "capsule"))
        material, surface = _pick(
            rng, (("film-coated tablet", "smooth and glossy"), ("pressed powder", "matte and fine-grained"),
                  ("gelatin", "smooth and glossy"))
        )
        params = {
            "radius": float(rng.uniform(0.22, 0.3)),
            "aspect": float(rng.uniform(1.3, 1.6)),
            "capsule_length": float(rng.uniform(0.3, 0.42)),
            "capsule_radius": float(rng.uniform(0.13, 0.18)),
            "angle": float(rng.uniform(0, 180)),
            "scored": bool(shape != "capsule" and rng.random() < 0.6),
            "glossy": "glossy" in surface,
        }
        if shape == "capsule":
            structure = "two rounded ends"
        else:
            structure = "a score line across the middle" if params["scored"] else "a plain domed top"
    elif family == "chip":
        shape = "integrated circuit chip"
        material, surface = _pick(rng, (("epoxy", "matte"), ("ceramic", "smooth and slightly glossy")))
        pins = int(rng.integers(3, 7))
        params = {
            "half_width": float(rng.uniform(0.22, 0.3)),
            "half_height": float(rng.uniform(0.13, 0.19)),
            "corner": float(rng.uniform(0.01, 0.03)),
            "pins": pins,
            "pin_length": float(rng.uniform(0.05, 0.08)),
            "pin_color": _pick(rng, ((192, 192, 198), (214, 176, 90))),
            "angle": float(_pick(rng, (0.0, 90.0))),
            "glossy": "glossy" in surface,
        }
        structure = f"{pins} pins along each long side and an orientation dot"
    elif family == "nut":
        shape = _pick(rng, ("hex nut", "square nut", "washer"))
        material, surface = _pick(
            rng, (("brushed steel", "brushed metal"), ("anodised aluminium", "matte anodised"),
                  ("moulded plastic", "smooth and glossy"))
        )
        params = {
            "radius": float(rng.uniform(0.26, 0.34)),
            "hole": float(rng.uniform(0.35, 0.55)),
            "angle": float(rng.uniform(0, 90)),
            "brushed": "brushed" in surface,
            "glossy": "glossy" in surface,
        }
        structure = "a round central hole"
    elif family == "items":
        shape = _pick(rng, ("beads", "cubes"))
        material, surface = _pick(rng, (("plastic", "smooth and glossy"), ("rubber", "matte"), ("glass", "glossy")))
        count = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
        params = {"item_radius": float(rng.uniform(0.06, 0.08)), "glossy": "glossy" in surface}
        structure = f"{count} {shape} scattered on the tray"
        in_context.append("wrong_count")
    elif family == "stripes":
        shape = "striped sheet"
        material, surface = _pick(rng, (("woven fabric", "finely woven"), ("printed film", "smooth")))
        pattern = _pick(rng, PATTERN_CHOICES["stripes"])
        params = {
            "period": float(rng.uniform(0.09, 0.15)),
            "duty": float(rng.uniform(0.35, 0.6)),
            "contrast": float(rng.uniform(0.22, 0.35)),
            "woven": material == "woven fabric",
        }
        structure = f"{pattern} stripes"
        in_context.append("wrong_pattern")
    elif family == "grid":
        shape = "mesh"
        material, surface = _pick(rng, (("wire mesh", "metallic"), ("woven fabric", "finely woven")))
        pattern = _pick(rng, PATTERN_CHOICES["grid"])
        params = {"thickness": float(rng.uniform(0.22, 0.35)), "angle": float(_pick(rng, (0.0, 45.0)))}
        structure = f"a {pattern} square grid of openings"
        in_context.append("wrong_pattern")
    elif family == "wood":
        shape = "board"
        material, surface = _pick(rng, (("stained wood", "planed and smooth"), ("painted wood", "satin finished")))
        params = {
            "angle": float(rng.uniform(0, 180)),
            "rings": float(rng.uniform(4.0, 8.0)),
            "turbulence": float(rng.uniform(0.5, 1.2)),
        }
        structure = "a flowing grain of growth rings"
    elif family == "leather":
        shape = "leather hide"
        material, surface = _pick(rng, (("leather", "grained"), ("synthetic leather", "finely grained")))
        params = {"grain": int(rng.integers(3, 6)), "pores": float(rng.uniform(0.55, 0.7))}
        structure = "an irregular natural grain with pores"
    elif family == "dots":
        shape = "dotted sheet"
        material, surface = _pick(rng, (("perforated metal sheet", "matte metallic"), ("printed fabric", "soft")))
        pattern = _pick(rng, PATTERN_CHOICES["dots"])
        params = {"dot_radius": float(rng.uniform(0.22, 0.32)), "perforated": material.startswith("perforated")}
        structure = f"a {pattern} lattice of {'holes' if params['perforated'] else 'dots'}"
        in_context.append("wrong_pattern")
    else:
        raise ValueError(f"unknown product family {family!r}; known: {', '.join(FAMILIES)}")
    return CategorySpec(
        index=index,
        name=category_name(index, family) if index >= 0 else f"foreign_{family}",
        family=family,
        shape=shape,
        material=material,
        surface=surface,
        color=color,
        background=background,
        structure=structure,
        allowed_colors=allowed,
        local_kinds=LOCAL_KINDS,
        in_context_kinds=tuple(in_context),
        pattern=pattern,
        count=count,
        params=params,
    )


def _describe_structure(spec: CategorySpec, pattern: str | None, count: int | None) -> str:
    """The structure phrase of a caption, for the pattern/count actually drawn in this image."""
    if spec.family == "items":
        return f"{count} {spec.shape} scattered on the tray"
    if spec.family == "stripes":
        return f"{pattern} stripes"
    if spec.family == "grid":
        return f"a {pattern} square grid of openings"
    if spec.family == "dots":
        return f"a {pattern} lattice of {'holes' if spec.params['perforated'] else 'dots'}"
    return spec.structure


# ==================================================================================================
# Rendering


@dataclass
class Rendering:
    """One rendered product image and the layers the defect makers need.

    `foreground` is the exact object (all True for textures); `backing` is what shows through when
    material is missing (the lit, noisy tray for objects; a dark backing for textures). It is
    quantised only when a defect asks for it, since most images never need it.
    """

    image: np.ndarray
    foreground: np.ndarray
    backing_layer: np.ndarray
    light: np.ndarray
    noise: np.ndarray

    @property
    def backing(self) -> np.ndarray:
        return np.clip(np.rint(self.backing_layer * self.light + self.noise), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size image, cached (read-only) per size."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _rotate(dy: np.ndarray, dx: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along the shape's axis, v across it) of offsets rotated by -degrees."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return dx * c + dy * s, -dx * s + dy * c


def _sd_box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float, corner: float = 0.0) -> np.ndarray:
    qx = np.abs(u) - (half_w - corner)
    qy = np.abs(v) - (half_h - corner)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - corner


def _sd_hexagon(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance to a regular hexagon with inner radius `radius` (flat sides top and bottom)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    px, py = np.abs(u), np.abs(v)
    dot = np.minimum(kx * px + ky * py, 0.0)
    px, py = px - 2 * dot * kx, py - 2 * dot * ky
    px = px - np.clip(px, -kz * radius, kz * radius)
    py = py - radius
    return np.hypot(px, py) * np.sign(py)


def _pose_color(spec: CategorySpec, pose: dict[str, Any], color: str | None) -> np.ndarray:
    """The product colour of this image: a palette colour plus the image's small colour shift."""
    base = np.array(PALETTE[color or spec.color], dtype=np.float32)
    return (base + np.asarray(pose["color_shift"], dtype=np.float32)) * pose["brightness"]


def draw_pose(spec: CategorySpec, rng: np.random.Generator) -> dict[str, Any]:
    """The per-image random variation of a category (position, rotation, lighting, noise, phase).

    Drawn before rendering and kept, so the same instance can be rendered again with one attribute
    changed (an in-context defect) and differ from its normal twin only where that attribute shows.
    """
    pose: dict[str, Any] = {
        "color_shift": rng.uniform(-5, 5, 3).round(2).tolist(),
        "brightness": float(rng.uniform(0.96, 1.04)),
        "light": rng.uniform(-0.07, 0.07, 2).tolist(),
        "noise_seed": int(rng.integers(2**31)),
        "noise_level": float(rng.uniform(1.5, 3.0)),
        "shift": rng.uniform(-0.05, 0.05, 2).tolist(),
        "angle": float(rng.uniform(-5, 5)),
        "scale": float(rng.uniform(0.96, 1.04)),
        "phase": rng.uniform(0, 1, 2).tolist(),
    }
    if spec.family == "items":
        pose["items"] = _scatter_items(spec, rng, (spec.count or COUNT_RANGE[0]) + 1)
    return pose


def _scatter_items(spec: CategorySpec, rng: np.random.Generator, count: int) -> list[list[float]]:
    """`count` non-overlapping (y, x, angle) item placements, as fractions of the side."""
    radius = spec.params["item_radius"]
    margin = radius * 1.4 + 0.04
    placed: list[list[float]] = []
    for _ in range(count):
        for _attempt in range(200):
            y, x = rng.uniform(margin, 1 - margin, 2)
            if all(math.hypot(y - p[0], x - p[1]) >= 2.6 * radius for p in placed):
                break
        placed.append([float(y), float(x), float(rng.uniform(0, 90))])
    return placed


@lru_cache(maxsize=8)
def _centred_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as fractions of the side minus 0.5 (the lighting gradient's coordinates)."""
    ys, xs = _grid(size)
    cy, cx = ys / size - 0.5, xs / size - 0.5
    cy.flags.writeable = False
    cx.flags.writeable = False
    return cy, cx


def _light_and_noise(pose: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image's lighting gradient and sensor noise: the same for any colour/count/pattern."""
    cy, cx = _centred_grid(size)
    gy, gx = pose["light"]
    light = (1.0 + gy * cy + gx * cx)[..., None]
    noise = np.random.default_rng(pose["noise_seed"] + 1).standard_normal((size, size, 1), dtype=np.float32)
    noise *= pose["noise_level"]
    return light, noise


def _dome(distance: np.ndarray, radius: float) -> np.ndarray:
    """A domed-part shading factor: 1 in the middle, darker towards the rim."""
    inside = np.clip(-distance / max(radius, 1e-3), 0.0, 1.0)
    return 0.8 + 0.2 * np.sqrt(inside)


def _highlight(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """A soft specular spot up and to the left of a part's centre (glossy materials)."""
    sigma = 0.28 * radius
    return np.exp(-((u + 0.35 * radius) ** 2 + (v + 0.4 * radius) ** 2) / (2 * sigma * sigma))


def _composite(base: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint `color` (HxWx3 or 3) over `base` with coverage `alpha` (HxW)."""
    return base + (color - base) * alpha[..., None]


def render_category_image(
    spec: CategorySpec,
    pose: dict[str, Any],
    size: int,
    *,
    color: str | None = None,
    count: int | None = None,
    pattern: str | None = None,
) -> Rendering:
    """Render one image of a category from its pose, optionally with another colour/count/pattern.

    A pure function of its arguments: rendering the same pose twice gives identical pixels, and
    overriding one attribute changes only the pixels where that attribute shows (that set is the
    in-context defect's mask).
    """
    ys, xs = _grid(size)
    noise_rng = np.random.default_rng(pose["noise_seed"])
    rgb = _pose_color(spec, pose, color)
    if spec.is_texture:
        layers, backing = _render_texture(spec, pose, size, rgb, pattern or spec.pattern, noise_rng)
        foreground = np.ones((size, size), dtype=bool)
    else:
        bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
        backing = np.broadcast_to(bg, (size, size, 3)).astype(np.float32)
        cy = (0.5 + pose["shift"][0]) * size
        cx = (0.5 + pose["shift"][1]) * size
        layers, alpha = _render_object(spec, pose, size, rgb, backing, ys - cy, xs - cx, count, noise_rng)
        foreground = alpha > 0.5
    light, noise = _light_and_noise(pose, size)
    image = np.clip(np.rint(layers * light + noise), 0, 255).astype(np.uint8)
    return Rendering(image=image, foreground=foreground, backing_layer=backing, light=light, noise=noise)


def _render_object(
    spec: CategorySpec,
    pose: dict[str, Any],
    size: int,
    rgb: np.ndarray,
    background: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    count: int | None,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Object families on a plain tray: returns (float HxWx3 layers, coverage of the object)."""
    p = spec.params
    scale = pose["scale"] * size
    white = np.float32(255.0)
    if spec.family == "pill":
        u, v = _rotate(dy, dx, p["angle"] + pose["angle"])
        if spec.shape == "capsule":
            radius = p["capsule_radius"] * scale
            half = p["capsule_length"] * scale / 2
            distance = np.hypot(np.maximum(np.abs(u) - half, 0), v) - radius
        elif spec.shape == "oval tablet":
            radius = p["radius"] * scale / math.sqrt(p["aspect"])
            a, b = radius * p["aspect"], radius
            distance = (np.hypot(u / a, v / b) - 1.0) * b
        else:
            radius = p["radius"] * scale
            distance = np.hypot(u, v) - radius
        body = rgb * _dome(distance, radius)[..., None]
        if spec.shape == "capsule":  # two-part shell: a faint seam across the middle
            seam = _coverage(np.abs(u) - 0.6) * 0.12
            body = body * (1 - seam[..., None])
        if p["scored"]:
            groove = _coverage(np.abs(v) - max(0.6, 0.012 * size)) * (distance < -0.12 * radius)
            body = body * (1 - 0.35 * groove[..., None])
        if p["glossy"]:
            body = _composite(body, white, 0.55 * _highlight(u, v, radius))
        alpha = _coverage(distance)
        return _composite(background, body, alpha), alpha
    if spec.family == "chip":
        u, v = _rotate(dy, dx, p["angle"] + pose["angle"])
        half_w, half_h = p["half_width"] * scale, p["half_height"] * scale
        pins = p["pins"]
        pin_len = p["pin_length"] * scale
        spacing = 1.5 * half_w / max(pins - 1, 1)
        first = -0.75 * half_w
        k = np.clip(np.rint((u - first) / spacing), 0, pins - 1)
        pin_u = u - (first + k * spacing)
        pin_distance = _sd_box(pin_u, np.abs(v) - half_h - pin_len / 2 + 0.5, 0.22 * spacing, pin_len / 2 + 0.5)
        pin_shade = 0.85 + 0.15 * np.clip(1 - np.abs(pin_u) / (0.22 * spacing), 0, 1)
        pin_rgb = np.array(p["pin_color"], dtype=np.float32) * pin_shade[..., None]
        pin_alpha = _coverage(pin_distance)
        layers = _composite(background, pin_rgb, pin_alpha)
        body_distance = _sd_box(u, v, half_w, half_h, p["corner"] * size)
        edge = np.clip(-body_distance / (0.04 * size), 0, 1)
        body = rgb * (0.82 + 0.18 * edge)[..., None]
        dot_distance = np.hypot(u + 0.7 * half_w, v + 0.5 * half_h) - 0.05 * size
        body = body * (1 - 0.35 * _coverage(dot_distance))[..., None]
        if p["glossy"]:
            body = _composite(body, white, 0.25 * np.exp(-(((u - v + 0.3 * half_w) / (0.35 * half_w)) ** 2)))
        body_alpha = _coverage(body_distance)
        return _composite(layers, body, body_alpha), np.maximum(pin_alpha, body_alpha)
    if spec.family == "nut":
        u, v = _rotate(dy, dx, p["angle"] + pose["angle"])
        radius = p["radius"] * scale
        if spec.shape == "hex nut":
            outer = _sd_hexagon(u, v, radius)
        elif spec.shape == "square nut":
            outer = _sd_box(u, v, radius, radius, 0.03 * size)
        else:
            outer = np.hypot(u, v) - radius
        hole_radius = p["hole"] * radius
        ring = np.hypot(u, v)
        distance = np.maximum(outer, hole_radius - ring)
        bevel = np.clip(-distance / (0.05 * size), 0, 1)
        shade = 0.72 + 0.28 * bevel
        if p["brushed"]:  # fine streaks along concentric circles: the signature of a lathe finish
            streaks = noise_rng.standard_normal(2 * size + 2).astype(np.float32)
            streaks = np.convolve(streaks, np.ones(3, dtype=np.float32) / 3, mode="same")
            shade = shade + 0.05 * streaks[np.clip(ring.astype(np.int64) * 2, 0, 2 * size + 1)]
        body = rgb * shade[..., None]
        if p["glossy"]:
            body = _composite(body, white, 0.4 * _highlight(u, v, radius))
        alpha = _coverage(distance)
        return _composite(background, body, alpha), alpha
    if spec.family == "items":
        placements = pose["items"][: count if count is not None else spec.count]
        radius = p["item_radius"] * scale
        layers = background.copy()
        alpha_all = np.zeros(dy.shape, dtype=np.float32)
        centre_y, centre_x = (0.5 + pose["shift"][0]) * size, (0.5 + pose["shift"][1]) * size
        for y, x, angle in placements:  # each item is drawn in its own small window only
            iy, ix = centre_y + (y - 0.5) * size, centre_x + (x - 0.5) * size
            window = _window(size, iy, ix, radius * 1.3)
            u, v = _rotate(dy[window] - (iy - centre_y), dx[window] - (ix - centre_x), angle)
            if spec.shape == "cubes":
                distance = _sd_box(u, v, 0.85 * radius, 0.85 * radius, 0.2 * radius)
            else:
                distance = np.hypot(u, v) - radius
            body = rgb * _dome(distance, radius)[..., None]
            if p["glossy"]:
                body = _composite(body, white, 0.55 * _highlight(u, v, radius))
            alpha = _coverage(distance)
            layers[window] = _composite(layers[window], body, alpha)
            alpha_all[window] = np.maximum(alpha_all[window], alpha)
        return layers, alpha_all
    raise ValueError(f"{spec.family!r} is not an object family")


def _render_texture(
    spec: CategorySpec,
    pose: dict[str, Any],
    size: int,
    rgb: np.ndarray,
    pattern: str | None,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame texture families: returns (float HxWx3 layers, dark backing for missing material)."""
    ys, xs = _grid(size)
    p = spec.params
    phase_y, phase_x = pose["phase"]
    backing = np.broadcast_to(rgb * 0.18 + 8.0, (size, size, 3)).astype(np.float32)
    if spec.family == "stripes":
        u, v = _rotate(ys - size / 2, xs - size / 2, STRIPE_ORIENTATIONS[pattern] + pose["angle"] * 0.4)
        period = p["period"] * size * pose["scale"]
        wave = np.sin(2 * math.pi * (v / period + phase_y))
        profile = np.clip((wave + math.cos(math.pi * p["duty"])) * 4.0, -1.0, 1.0)
        shade = 1.0 + p["contrast"] * profile
        if p["woven"]:
            fine = max(2.0, period / 4)
            shade = shade + 0.04 * np.sin(2 * math.pi * u / fine) * np.sin(2 * math.pi * v / fine)
        return rgb * shade[..., None], backing
    if spec.family == "grid":
        cell = GRID_CELLS[pattern] * size * pose["scale"]
        u, v = _rotate(ys - size / 2, xs - size / 2, p["angle"] + pose["angle"] * 0.4)
        fu = np.abs(((u / cell + phase_x) % 1.0) - 0.5) * cell  # distance to the cell centre along u
        fv = np.abs(((v / cell + phase_y) % 1.0) - 0.5) * cell
        half_line = p["thickness"] * cell / 2
        to_line = cell / 2 - np.maximum(fu, fv)  # distance to the nearest wire's centre line
        alpha = _coverage(to_line - half_line)
        wire = 0.75 + 0.25 * np.cos(np.clip(to_line / max(half_line, 0.5), 0, 1) * math.pi / 2)
        return _composite(backing * 1.6, rgb * wire[..., None], alpha), backing
    if spec.family == "wood":
        u, v = _rotate(ys - size / 2, xs - size / 2, p["angle"])
        turbulence = fractal_perlin_noise((size, size), (2, 2), noise_rng, octaves=3)
        field_ = (v / size + phase_y) * p["rings"] + p["turbulence"] * turbulence
        rings = (0.5 + 0.5 * np.sin(2 * math.pi * field_)) ** 3
        streak_index = np.clip((v + size).astype(np.int64), 0, 2 * size - 1)
        streaks = noise_rng.standard_normal(2 * size).astype(np.float32)[streak_index]
        shade = 1.05 - 0.32 * rings + 0.035 * streaks
        return rgb * shade[..., None], backing
    if spec.family == "leather":
        grain = fractal_perlin_noise((size, size), (p["grain"], p["grain"]), noise_rng, octaves=3)
        pore_res = max(4, size // 5)
        pore_field = fractal_perlin_noise((size, size), (pore_res, pore_res), noise_rng, octaves=1)
        pores = np.clip((pore_field - p["pores"]) * 5, 0, 1)
        shade = (0.92 + 0.16 * grain) * (1 - 0.35 * pores)
        return rgb * shade[..., None], backing
    if spec.family == "dots":
        lattice, spacing_fraction = DOT_LATTICES[pattern]
        spacing = spacing_fraction * size * pose["scale"]
        radius = p["dot_radius"] * spacing
        u, v = _rotate(ys - size / 2, xs - size / 2, pose["angle"] * 0.4)
        if lattice == "square":
            du = ((u / spacing + phase_x) % 1.0 - 0.5) * spacing
            dv = ((v / spacing + phase_y) % 1.0 - 0.5) * spacing
            distance = np.hypot(du, dv) - radius
        else:
            row = spacing * math.sqrt(3)
            du = ((u / spacing + phase_x) % 1.0 - 0.5) * spacing
            dv = ((v / row + phase_y) % 1.0 - 0.5) * row
            du2 = ((u / spacing + phase_x + 0.5) % 1.0 - 0.5) * spacing
            dv2 = ((v / row + phase_y + 0.5) % 1.0 - 0.5) * row
            distance = np.minimum(np.hypot(du, dv), np.hypot(du2, dv2)) - radius
        dot_rgb = backing if p["perforated"] else rgb + (255.0 - rgb) * 0.55
        return _composite(np.broadcast_to(rgb, (size, size, 3)), dot_rgb, _coverage(distance)), backing
    raise ValueError(f"{spec.family!r} is not a texture family")


# ==================================================================================================
# Defects


def _location_phrase(mask: np.ndarray) -> str:
    """Where the defect is, in words ("upper left area", "central area"), from its mask's centroid."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = ("upper", "", "lower")[min(2, int(3 * ys.mean() / h))]
    col = ("left", "", "right")[min(2, int(3 * xs.mean() / w))]
    words = " ".join(word for word in (row, col) if word)
    return f"{words} area" if words else "central area"


def _random_foreground_point(rng: np.random.Generator, foreground: np.ndarray) -> tuple[float, float]:
    """A random pixel centre on the object, away from the image border when the object allows it
    (a defect centred on the frame edge would be mostly cut off and barely visible)."""
    size = foreground.shape[0]
    margin = max(2, int(0.1 * size))
    inner = np.zeros_like(foreground)
    inner[margin:-margin, margin:-margin] = foreground[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else foreground)
    pick = int(rng.integers(len(ys)))
    return float(ys[pick]) + 0.5, float(xs[pick]) + 0.5


def _window(size: int, cy: float, cx: float, radius: float) -> tuple[slice, slice]:
    """The square crop around a point that a local defect can touch (keeps the maths small)."""
    r = int(math.ceil(radius)) + 2
    rows = slice(max(0, int(cy) - r), min(size, int(cy) + r + 1))
    cols = slice(max(0, int(cx) - r), min(size, int(cx) + r + 1))
    return rows, cols


def _paint(
    image: np.ndarray, window: tuple[slice, slice], color: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Paint `color` (with a little noise, like the rest of the image) into a crop of a copy of `image`."""
    out = image.copy()
    crop = out[window].astype(np.float32)
    noisy = color + rng.normal(0, 2.0, crop.shape[:2] + (1,)).astype(np.float32)
    out[window] = np.clip(np.rint(_composite(crop, noisy, alpha)), 0, 255).astype(np.uint8)
    return out


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(np.asarray(rgb, dtype=np.float32).reshape(-1, 3).mean(0), [0.299, 0.587, 0.114]))


def _defect_scratch(spec, rendering, rng, size):
    """A thin, slightly curved line (quadratic Bezier), dark on bright parts and bright on dark ones."""
    image, fg = rendering.image, rendering.foreground
    y0, x0 = _random_foreground_point(rng, fg)
    length = rng.uniform(0.12, 0.25 if spec.family == "items" else 0.45) * size
    theta = rng.uniform(0, 2 * math.pi)
    y2, x2 = y0 + length * math.sin(theta), x0 + length * math.cos(theta)
    if not (0 <= y2 < size and 0 <= x2 < size):  # run the other way rather than off the frame
        y2, x2 = y0 - length * math.sin(theta), x0 - length * math.cos(theta)
    bend = rng.uniform(-0.25, 0.25) * length
    y1, x1 = (y0 + y2) / 2 + bend * math.cos(theta), (x0 + x2) / 2 - bend * math.sin(theta)
    t = np.linspace(0, 1, 10, dtype=np.float32)[:, None]
    curve = (1 - t) ** 2 * np.array([y0, x0]) + 2 * (1 - t) * t * np.array([y1, x1]) + t**2 * np.array([y2, x2])
    curve = curve.tolist()  # Python floats: numpy float64 scalars would silently upcast the float32 maths
    thickness = max(1.3, rng.uniform(0.012, 0.025) * size)
    window = _window(size, (y0 + y2) / 2, (x0 + x2) / 2, length / 2 + abs(bend) + thickness)
    ys, xs = _grid(size)
    py, px = ys[window], xs[window]
    distance = np.full(py.shape, np.inf, dtype=np.float32)
    for (ay, ax), (by, bx) in zip(curve[:-1], curve[1:]):
        ey, ex = by - ay, bx - ax
        tt = np.clip(((py - ay) * ey + (px - ax) * ex) / max(ey * ey + ex * ex, 1e-6), 0, 1)
        distance = np.minimum(distance, np.hypot(py - ay - tt * ey, px - ax - tt * ex))
    alpha = _coverage(distance - thickness / 2) * fg[window]
    local = image[window][fg[window]]
    dark = _luminance(local) > 110
    color = np.array((30, 28, 26) if dark else (235, 235, 228), dtype=np.float32)
    tone = "dark" if dark else "bright"
    return _paint(image, window, color, alpha * rng.uniform(0.75, 0.95), rng), (
        f"a thin {tone} scratch across the {{loc}} of the {spec.object_noun}"
    )


def _defect_hole(spec, rendering, rng, size):
    """A round pit: a near-black interior with a light rim where the edge catches the light."""
    image, fg = rendering.image, rendering.foreground
    cy, cx = _random_foreground_point(rng, fg)
    radius = max(2.0, rng.uniform(0.035, 0.06 if spec.family == "items" else 0.075) * size)
    window = _window(size, cy, cx, radius + 2)
    ys, xs = _grid(size)
    distance = np.hypot(ys[window] - cy, xs[window] - cx)
    rim = _coverage(np.abs(distance - radius) - 0.9) * 0.45
    inside = _coverage(distance - radius)
    local = image[window].astype(np.float32)
    hole_rgb = local * 0.12 + 6.0
    rim_rgb = local + (255 - local) * 0.5
    painted = _composite(_composite(local, rim_rgb, rim), hole_rgb, inside)
    touched = (np.maximum(rim, inside) > 0) & fg[window]
    painted = painted + rng.normal(0, 1.5, local.shape[:2] + (1,)).astype(np.float32)
    out = image.copy()
    out[window] = np.where(touched[..., None], np.clip(np.rint(painted), 0, 255), local).astype(np.uint8)
    return out, f"a {_size_word_for(radius, size)} round hole in the {{loc}} of the {spec.object_noun}"


def _size_word_for(radius: float, size: int) -> str:
    return "small" if radius < 0.05 * size else "medium-sized"


def _irregular_disc(ys, xs, cy, cx, radius, rng):
    """Signed distance to a disc whose radius wobbles with angle (a chipped or torn outline)."""
    angle = np.arctan2(ys - cy, xs - cx)
    wobble = np.zeros_like(angle)
    for harmonic in (2, 3, 5):
        wobble += rng.uniform(0.03, 0.1) * np.cos(harmonic * angle + rng.uniform(0, 2 * math.pi))
    return np.hypot(ys - cy, xs - cx) - radius * (1 + wobble)


def _defect_missing_piece(spec, rendering, rng, size):
    """A chipped-off chunk at the part's edge (the tray shows through), or a torn hole in a texture."""
    image, fg = rendering.image, rendering.foreground
    if spec.is_texture:
        cy, cx = (float(value) for value in rng.uniform(0.2, 0.8, 2) * size)
        radius = rng.uniform(0.06, 0.12) * size
        phrase = "a torn hole through the material in the {loc}, showing the dark backing"
    else:
        edge = fg & ~(_erode(fg))
        cy, cx = _random_foreground_point(rng, edge if edge.any() else fg)
        item = spec.params.get("item_radius")
        radius = (rng.uniform(0.5, 0.8) * item if item else rng.uniform(0.08, 0.15)) * size
        phrase = f"a piece broken off the {spec.object_noun} at the {{loc}}, exposing the tray"
    window = _window(size, cy, cx, radius * 1.4)
    ys, xs = _grid(size)
    alpha = _coverage(_irregular_disc(ys[window], xs[window], cy, cx, radius, rng)) * fg[window]
    out = image.copy()
    exposed = _composite(image[window].astype(np.float32), rendering.backing[window].astype(np.float32), alpha)
    out[window] = np.clip(np.rint(exposed), 0, 255).astype(np.uint8)
    return out, phrase


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are all in the mask (a one-pixel erosion)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _defect_contamination(spec, rendering, rng, size):
    """An irregular, speckled blob of foreign matter (oil, rust, dust...) that contrasts with the part."""
    image, fg = rendering.image, rendering.foreground
    cy, cx = _random_foreground_point(rng, fg)
    radius = max(2.5, rng.uniform(0.04, 0.06 if spec.family == "items" else 0.1) * size)
    window = _window(size, cy, cx, radius * 1.6)
    ys, xs = _grid(size)
    wy, wx = ys[window], xs[window]
    local = image[window].astype(np.float32)
    names = [n for n, c in CONTAMINANTS.items() if np.linalg.norm(np.array(c) - local.reshape(-1, 3).mean(0)) > 90]
    name = _pick(rng, names or list(CONTAMINANTS))
    blob = _irregular_disc(wy, wx, cy, cx, radius, rng)
    speckle = rng.normal(0, 0.6, wy.shape).astype(np.float32)
    alpha = np.clip(0.5 - blob + speckle * (blob > -2), 0, 1) * rng.uniform(0.75, 0.95) * fg[window]
    out = _paint(image, window, np.array(CONTAMINANTS[name], dtype=np.float32), alpha, rng)
    size_word = _size_word_for(radius, size)
    return out, f"a {size_word} patch of {name} contamination on the {{loc}} of the {spec.object_noun}"


def _defect_cutpaste(spec, rendering, rng, size):
    """CutPaste patch (synthesis.py), with stronger colour jitter so it shows at 64-128 px."""
    result, _ = cutpaste_patch(
        rendering.image, rng, area_ratio=(0.015, 0.06), color_jitter_strength=0.3,
        foreground=rendering.foreground, min_changed_fraction=0.7,
    )
    return np.asarray(result), "a misplaced rectangular patch with a slightly different colour in the {loc}"


def _defect_scar(spec, rendering, rng, size):
    """CutPaste scar (synthesis.py): a thin rotated strip of displaced material."""
    result, _ = cutpaste_scar(
        rendering.image, rng, width_fraction=(0.025, 0.05), length_fraction=(0.15, 0.35),
        color_jitter_strength=0.3, foreground=rendering.foreground, min_changed_fraction=0.7,
    )
    return np.asarray(result), "a thin elongated scar of displaced material in the {loc}"


def _foreign_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A texture from another (random) product look, to blend in as the DRAEM-style foreign material."""
    family = _pick(rng, TEXTURE_FAMILIES)
    spec = _draw_spec(-1, family, rng)
    rendering = render_category_image(spec, draw_pose(spec, rng), size)
    return rendering.image, f"{spec.color} {spec.material}"


def _defect_texture_blend(spec, rendering, rng, size):
    """DRAEM-style Perlin blend (synthesis.py) of another product's texture, on the part only."""
    texture, what = _foreign_texture(rng, size)
    top = max(1, int(math.log2(max(2, size // 8))))
    result, _ = perlin_blend(
        rendering.image, texture, rng, rendering.foreground, opacity=(0.6, 1.0),
        scale_exponents=(1, top), min_area_fraction=0.004,
    )
    return np.asarray(result), f"a blotch of foreign {what} texture blended into the {{loc}}"


LocalDefect = Callable[[CategorySpec, Rendering, np.random.Generator, int], tuple[np.ndarray, str]]
_LOCAL_DEFECTS: dict[str, LocalDefect] = {
    "scratch": _defect_scratch,
    "hole": _defect_hole,
    "missing_piece": _defect_missing_piece,
    "contamination": _defect_contamination,
    "cutpaste": _defect_cutpaste,
    "scar": _defect_scar,
    "texture_blend": _defect_texture_blend,
}


def _min_defect_pixels(size: int) -> int:
    """Smallest acceptable local defect (about 0.1% of the image, at least 6 px): below that a
    defect is invisible at this resolution and would only teach the model to guess."""
    return max(6, int(0.001 * size * size))


# ==================================================================================================
# One image


@dataclass
class MadeImage:
    """One generated image before it is written: pixels, mask, caption and attributes.

    `reference` is the defect-free twin of an anomalous image (same pose, lighting and noise; None
    for a normal image): the mask is exactly where the two differ (for textures' in-context kinds,
    the whole surface). Kept for callers that want aligned normal/anomalous pairs, e.g. the
    stage-2 "difference regions between two images" task.
    """

    image: np.ndarray
    mask: np.ndarray | None
    caption: str
    attributes: dict[str, Any]
    reference: np.ndarray | None = None


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _placement_phrase(pose: dict[str, Any] | None) -> str:
    """Where the part sits and where the light comes from, read off the pose (captions then vary
    with the image instead of repeating one sentence per category)."""
    if pose is None:
        return ""
    dy, dx = pose["shift"]
    vertical = "top" if dy < -0.025 else "bottom" if dy > 0.025 else ""
    horizontal = "left" if dx < -0.025 else "right" if dx > 0.025 else ""
    direction = " ".join(word for word in (vertical, horizontal) if word)
    where = f"slightly towards the {direction}" if direction else "centred"
    gy, gx = pose["light"]
    if max(abs(gy), abs(gx)) < 0.04:
        light = "evenly lit"
    elif abs(gx) >= abs(gy):
        light = f"lit a little more from the {'right' if gx > 0 else 'left'}"
    else:
        light = f"lit a little more from {'below' if gy > 0 else 'above'}"
    return f"{where} in the frame, {light}"


def _caption(
    spec: CategorySpec,
    color: str,
    pattern: str | None,
    count: int | None,
    defect: str | None,
    pose: dict[str, Any] | None = None,
) -> str:
    """A caption naming shape, material, colour, structure and surface quality, then the defect."""
    structure = _describe_structure(spec, pattern, count)
    placement = _placement_phrase(pose)
    if spec.is_texture:
        text = (
            f"A close-up of {_article(color).lower()} {color} {spec.material} {spec.shape} with {structure}. "
            f"The surface is {spec.surface}."
        )
    elif spec.family == "items":
        text = (
            f"{count} {color} {spec.material} {spec.shape} scattered on a {spec.background} tray. "
            f"Their surfaces are {spec.surface}."
        )
    else:
        where = f", {placement}" if placement else ""
        text = (
            f"{_article(color)} {color} {spec.material} {spec.shape} with {structure}, lying on a "
            f"{spec.background} tray{where}. The surface is {spec.surface}."
        )
    return f"{text} {defect}" if defect else f"{text} No defects are visible."


def make_image(spec: CategorySpec, kind: str, rng: np.random.Generator, size: int) -> MadeImage:
    """Render one image of `spec` with defect `kind` ("good" for a normal image)."""
    pose = draw_pose(spec, rng)
    attributes: dict[str, Any] = {"color": spec.color, "pattern": spec.pattern, "count": spec.count}
    if kind == NORMAL_KIND:
        rendering = render_category_image(spec, pose, size)
        caption = _caption(spec, spec.color, spec.pattern, spec.count, None, pose)
        return MadeImage(rendering.image, None, caption, attributes)
    if kind in IN_CONTEXT_KINDS:
        if kind not in spec.in_context_kinds:
            raise ValueError(f"defect kind {kind!r} does not apply to {spec.family} category {spec.name}")
        normal = render_category_image(spec, pose, size)
        note = "the image looks normal on its own; the fault shows only against normal examples of this product."
        if kind == "wrong_color":
            color = _pick(rng, [c for c in spec.allowed_colors if c != spec.color])
            attributes["color"] = color
            rendering = render_category_image(spec, pose, size, color=color)
            defect = f"Defect: it is {color} instead of this product's usual {spec.color}; {note}"
        elif kind == "wrong_count":
            low, high = COUNT_RANGE
            options = [c for c in (spec.count - 1, spec.count + 1) if low <= c <= high]
            count = _pick(rng, options)
            attributes["count"] = count
            rendering = render_category_image(spec, pose, size, count=count)
            defect = f"Defect: there are {count} {spec.shape} instead of the usual {spec.count}; {note}"
        else:
            pattern = _pick(rng, [p for p in PATTERN_CHOICES[spec.family] if p != spec.pattern])
            attributes["pattern"] = pattern
            rendering = render_category_image(spec, pose, size, pattern=pattern)
            shown, usual = _describe_structure(spec, pattern, None), _describe_structure(spec, spec.pattern, None)
            defect = f"Defect: it has {shown}, whereas this product normally has {usual}; {note}"
        if spec.is_texture:  # the changed object is the whole surface, not its scattered changed pixels
            mask = np.ones(rendering.image.shape[:2], dtype=bool)
        else:  # the recoloured body or the added/removed item: exactly the pixels that changed
            mask = np.any(rendering.image != normal.image, axis=2)
        caption = _caption(spec, attributes["color"], attributes["pattern"], attributes["count"], defect, pose)
        return MadeImage(rendering.image, mask, caption, attributes, normal.image)
    if kind not in _LOCAL_DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(LOCAL_KINDS + IN_CONTEXT_KINDS)}")
    minimum = _min_defect_pixels(size)
    for _attempt in range(12):
        rendering = render_category_image(spec, pose, size)
        image, phrase = _LOCAL_DEFECTS[kind](spec, rendering, rng, size)
        mask = np.any(image != rendering.image, axis=2)
        if mask.sum() >= minimum:
            break
        pose = draw_pose(spec, rng)
    else:
        raise RuntimeError(f"could not place a visible {kind} defect on {spec.name} at {size} px")
    defect = "Defect: " + phrase.format(loc=_location_phrase(mask)) + "."
    caption = _caption(spec, spec.color, spec.pattern, spec.count, defect, pose)
    return MadeImage(image, mask, caption, attributes, rendering.image)


# ==================================================================================================
# The factory


@dataclass
class FactoryResult:
    """What `make_synthetic` made: the output folder, category names and image counts."""

    out: Path
    categories: list[str]
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _save_png(array: np.ndarray, path: Path) -> None:
    """PNG with light compression: several times faster than the default and still lossless."""
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _defect_class(kind: str) -> str:
    """"normal", "local" (visible in the image alone) or "in_context" (only against exemplars)."""
    return "normal" if kind == NORMAL_KIND else "in_context" if kind in IN_CONTEXT_KINDS else "local"


def _make_category(job: tuple[int, int, dict[str, Any], str]) -> dict[str, Any]:
    """Generate and write one category (runs in a worker process when `workers` > 1)."""
    seed, index, params, out = job
    spec = category_spec(seed, index)
    size = params["image_size"]
    root = Path(out)
    kinds = params["kinds"]
    local = [k for k in spec.local_kinds if kinds is None or k in kinds]
    in_context = [k for k in spec.in_context_kinds if kinds is None or k in kinds]
    plan = [("train", NORMAL_KIND, params["train_normals"]), ("test", NORMAL_KIND, params["test_normals"])]
    plan += [("test", kind, params["test_anomalies_per_kind"]) for kind in local + in_context]
    captions: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    for split, kind, number in plan:
        folder = root / spec.name / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        if kind != NORMAL_KIND:
            (root / spec.name / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        stream = _stream_code(f"{split}/{kind}")
        for i in range(number):
            made = make_image(spec, kind, _rng(seed, index, stream, i), size)
            relative = f"{spec.name}/{split}/{kind}/{i:03d}.png"
            _save_png(made.image, root / relative)
            mask_relative = None
            if made.mask is not None:
                mask_relative = f"{spec.name}/ground_truth/{kind}/{i:03d}_mask.png"
                _save_png(made.mask.astype(np.uint8) * 255, root / mask_relative)
            captions.append({"image": relative, "caption": made.caption})
            records.append(
                {
                    "image": relative,
                    "category": spec.name,
                    "category_index": index,
                    "split": split,
                    "defect": kind,
                    "defect_class": _defect_class(kind),
                    "mask": mask_relative,
                    "attributes": made.attributes,
                }
            )
    description = asdict(spec)
    description["color_rgb"] = list(PALETTE[spec.color])
    description["background_rgb"] = list(BACKGROUNDS[spec.background]) if spec.background else None
    description["defect_kinds"] = {"local": local, "in_context": in_context}
    description["description"] = _caption(spec, spec.color, spec.pattern, spec.count, None).replace(
        " No defects are visible.", ""
    )
    for key in ("local_kinds", "in_context_kinds"):
        description.pop(key)
    return {"spec": description, "captions": captions, "records": records}


def _category_indices(categories: int | Sequence[int], first_category: int) -> list[int]:
    if isinstance(categories, int):
        if categories < 1:
            raise ValueError(f"categories must be at least 1, got {categories}")
        return list(range(first_category, first_category + categories))
    indices = [int(i) for i in categories]
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise ValueError(f"category indices must be distinct and non-negative, got {indices}")
    return indices


def _prepare_output(out: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix two different factory runs in one folder (unless `overwrite`).

    Re-running with identical parameters simply rewrites the same bytes (resuming a crashed run);
    with `overwrite`, the previous run's category folders and files are removed first.
    """
    manifest = out / "factory.json"
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{manifest}: unreadable factory manifest ({error}); remove it or pick another folder")
        if previous.get("params") == params:
            return
        if not overwrite:
            raise ValueError(
                f"{out} already holds a synthetic factory made with different parameters "
                f"({previous.get('params')}); pass overwrite=True (--overwrite) or pick another folder"
            )
        for category in previous.get("categories", []):
            name = str(category.get("name", ""))
            if name and "/" not in name and name not in (".", ".."):
                shutil.rmtree(out / name, ignore_errors=True)
        for name in ("captions.jsonl", "images.jsonl", "factory.json"):
            (out / name).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} is not empty and is not a synthetic factory folder; pass overwrite=True or pick another folder"
        )


def make_synthetic(
    out: str | os.PathLike[str],
    categories: int | Sequence[int] = 8,
    seed: int = 0,
    image_size: int = 128,
    train_normals: int = 20,
    test_normals: int = 10,
    test_anomalies_per_kind: int = 4,
    *,
    first_category: int = 0,
    kinds: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> FactoryResult:
    """Make a synthetic factory dataset in MVTec-AD layout (see the module docstring for the layout).

    `categories` is a count (indices `first_category` .. `first_category + categories - 1`) or an
    explicit list of indices; category i's files depend only on (seed, i) and the per-image
    settings, so disjoint index ranges give disjoint, independent train and held-out categories.
    `kinds` restricts the defect kinds made (local and/or in-context names; kinds that do not apply
    to a family are skipped there). `workers` > 1 spreads categories over processes; the output is
    the same. Returns a `FactoryResult` with the wall time, from which images/s follows.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 px, got {image_size}")
    for name, value in (("train_normals", train_normals), ("test_normals", test_normals),
                        ("test_anomalies_per_kind", test_anomalies_per_kind)):
        if value < 0 or value > 1000:
            raise ValueError(f"{name} must be between 0 and 1000 (3-digit file names), got {value}")
    if train_normals < 1:
        raise ValueError("train_normals must be at least 1: every category needs normal exemplars")
    if kinds is not None:
        unknown = sorted(set(kinds) - set(LOCAL_KINDS) - set(IN_CONTEXT_KINDS))
        if unknown:
            raise ValueError(f"unknown defect kinds {unknown}; known: {', '.join(LOCAL_KINDS + IN_CONTEXT_KINDS)}")
        kinds = sorted(set(kinds))
    indices = _category_indices(categories, first_category)
    out_path = Path(out)
    params = {
        "seed": seed,
        "category_indices": indices,
        "image_size": image_size,
        "train_normals": train_normals,
        "test_normals": test_normals,
        "test_anomalies_per_kind": test_anomalies_per_kind,
        "kinds": kinds,
    }
    _prepare_output(out_path, params, overwrite)
    out_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(seed, index, params, str(out_path)) for index in indices]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(_make_category, jobs))
    else:
        results = [_make_category(job) for job in jobs]
    with open(out_path / "captions.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            for line in result["captions"]:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    with open(out_path / "images.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            for record in result["records"]:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    manifest = {
        "format": FACTORY_FORMAT,
        "params": params,
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "defect_kinds": {"local": list(LOCAL_KINDS), "in_context": list(IN_CONTEXT_KINDS)},
        "files": {"captions": "captions.jsonl", "images": "images.jsonl"},
        "categories": [result["spec"] for result in results],
    }
    (out_path / "factory.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    images = sum(len(result["records"]) for result in results)
    return FactoryResult(out_path, [r["spec"]["name"] for r in results], images, time.perf_counter() - start)


# ==================================================================================================
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `iadgpt make-synthetic` options (the lead's cli.py adds them to its sub-parser)."""
    parser.add_argument("out", help="output folder (MVTec-AD layout, plus captions.jsonl, images.jsonl, factory.json)")
    parser.add_argument("--categories", type=int, default=8, help="number of product categories (default 8)")
    parser.add_argument("--first-category", type=int, default=0,
                        help="index of the first category; use disjoint ranges for train and held-out sets")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed gives byte-identical files")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels (>= 32)")
    parser.add_argument("--train-normals", type=int, default=20, help="normal training images per category")
    parser.add_argument("--test-normals", type=int, default=10, help="normal test images per category")
    parser.add_argument("--test-anomalies-per-kind", type=int, default=4, help="anomalous test images per defect kind")
    parser.add_argument("--kinds", default=None,
                        help="comma-separated defect kinds to make (default all): "
                        + ",".join(LOCAL_KINDS + IN_CONTEXT_KINDS))
    parser.add_argument("--workers", type=int, default=1, help="processes to spread categories over")
    parser.add_argument("--overwrite", action="store_true", help="replace a different factory run already in OUT")
    return parser


def run(args: argparse.Namespace) -> FactoryResult:
    """Run `iadgpt make-synthetic` from parsed arguments and print a one-line summary."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    try:
        result = make_synthetic(
            args.out, args.categories, seed=args.seed, image_size=args.image_size,
            train_normals=args.train_normals, test_normals=args.test_normals,
            test_anomalies_per_kind=args.test_anomalies_per_kind, first_category=args.first_category,
            kinds=kinds, workers=args.workers, overwrite=args.overwrite,
        )
    except ValueError as error:
        raise SystemExit(f"iadgpt make-synthetic: {error}") from None
    print(
        f"Wrote {result.images} images in {len(result.categories)} categories to {result.out} "
        f"({result.images_per_second:.0f} images/s)"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m iadgpt.data.factory OUT ...`: the same as `iadgpt make-synthetic OUT ...`."""
    parser = argparse.ArgumentParser(prog="iadgpt make-synthetic", description=__doc__.split("\n\n")[0])
    run(add_arguments(parser).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
