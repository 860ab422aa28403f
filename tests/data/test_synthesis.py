"""Defect synthesis: masks are exactly the changed pixels, draws are seeded, foregrounds are respected.

The images are small product-like pictures the tests draw themselves (a textured disc on a plain
tray with sensor noise), so every property is checked against known ground truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iadgpt.data.synthesis import (
    as_generator,
    cutpaste_patch,
    cutpaste_scar,
    foreground_mask,
    fractal_perlin_noise,
    perlin_blend,
    perlin_noise,
)

SIZE = 96


def _disc(size: int = SIZE, radius: float = 0.3, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A noisy, shaded orange disc on a grey tray, and its true foreground mask."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    distance = np.hypot(ys - size / 2, xs - size / 2)
    disc = distance < radius * size
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = (110, 110, 115)
    shade = 0.8 + 0.2 * np.cos(distance / (radius * size) * np.pi / 2)
    pixels[disc] = np.array([220, 130, 40], dtype=np.float32) * shade[disc][:, None]
    pixels += rng.normal(0, 2.0, (size, size, 1))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), disc


def _texture(size: int = SIZE, seed: int = 1) -> Image.Image:
    """A blue-green stripe texture, the 'foreign' material of the Perlin blend."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    stripes = (np.sin((xs + ys) / 3.0) > 0)[..., None]
    pixels = np.where(stripes, [30, 90, 200], [20, 160, 90]) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


SYNTHESES = {
    "cutpaste_patch": lambda image, rng, fg=None: cutpaste_patch(image, rng, foreground=fg),
    "cutpaste_scar": lambda image, rng, fg=None: cutpaste_scar(image, rng, foreground=fg),
    "perlin_blend": lambda image, rng, fg=None: perlin_blend(image, _texture(), rng, fg),
}


@pytest.mark.parametrize("name", sorted(SYNTHESES))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mask_is_exactly_the_set_of_changed_pixels(name: str, seed: int) -> None:
    image, disc = _disc()
    result, mask = SYNTHESES[name](image, seed, disc)
    before, after = np.asarray(image), np.asarray(result)
    assert result.mode == "RGB" and result.size == image.size
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    changed = np.any(before != after, axis=2)
    assert mask.sum() > 0, "the synthesis changed nothing"
    assert np.array_equal(before[~mask], after[~mask]), "pixels outside the mask were modified"
    assert changed[mask].mean() > 0.99, "most pixels inside the mask must differ"
    assert np.array_equal(mask, changed)


@pytest.mark.parametrize("name", sorted(SYNTHESES))
def test_same_seed_same_result_and_different_seed_different(name: str) -> None:
    image, disc = _disc()
    first, first_mask = SYNTHESES[name](image, 7, disc)
    again, again_mask = SYNTHESES[name](image, np.random.default_rng(7), disc)  # int seed == Generator(seed)
    other, other_mask = SYNTHESES[name](image, 8, disc)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and np.array_equal(first_mask, again_mask)
    assert not np.array_equal(first_mask, other_mask)


def test_input_image_is_not_modified_and_any_mode_is_accepted() -> None:
    image, _ = _disc()
    grey = image.convert("L")
    snapshot = np.asarray(grey).copy()
    result, mask = cutpaste_patch(grey, 0, color_jitter_strength=0.0)
    assert np.array_equal(np.asarray(grey), snapshot)
    assert result.mode == "RGB" and mask.any()


def test_perlin_blend_stays_inside_the_foreground() -> None:
    image, _ = _disc()
    foreground = np.zeros((SIZE, SIZE), dtype=bool)
    foreground[:, : SIZE // 3] = True  # the left third only
    for seed in range(8):
        _, mask = perlin_blend(image, _texture(), seed, foreground, opacity=(0.8, 1.0))
        assert mask.any()
        assert not (mask & ~foreground).any(), f"seed {seed}: blend leaked outside the foreground"
    # Without a foreground, blobs land anywhere: over 8 seeds, some leave the left third.
    assert any((perlin_blend(image, _texture(), seed)[1] & ~foreground).any() for seed in range(8))


def test_perlin_blend_opacity_one_copies_the_texture_inside_the_mask() -> None:
    image, disc = _disc()
    texture = _texture()
    result, mask = perlin_blend(image, texture, 3, disc, opacity=(1.0, 1.0))
    candidates = [np.asarray(texture)]  # the texture may be flipped/rotated by 90-degree steps
    candidates = [np.rot90(t, k) for t in candidates for k in range(4)]
    candidates += [t[:, ::-1] for t in candidates]
    after = np.asarray(result)
    assert any(np.array_equal(after[mask], t[mask]) for t in candidates)


def test_cutpaste_patch_is_a_rectangle_of_the_requested_size_centred_on_the_foreground() -> None:
    image, _ = _disc()
    foreground = np.zeros((SIZE, SIZE), dtype=bool)
    foreground[40:56, 40:56] = True
    for seed in range(10):
        _, mask = cutpaste_patch(
            image, seed, area_ratio=(0.02, 0.05), color_jitter_strength=0.5, foreground=foreground,
            min_changed_fraction=0.95,
        )
        ys, xs = np.nonzero(mask)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 0.015 <= height * width / SIZE**2 <= 0.06
        assert mask.sum() >= 0.9 * height * width, "a CutPaste patch is a filled rectangle"
        centre = (int((ys.min() + ys.max()) / 2), int((xs.min() + xs.max()) / 2))
        assert foreground[max(0, centre[0] - 1) : centre[0] + 2, max(0, centre[1] - 1) : centre[1] + 2].any()


def test_cutpaste_scar_is_thin_and_long() -> None:
    image, _ = _disc()
    for seed in range(6):
        _, mask = cutpaste_scar(image, seed, color_jitter_strength=0.5)
        ys, xs = np.nonzero(mask)
        eigen = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
        assert eigen[1] > 6 * eigen[0], f"seed {seed}: scar is not elongated (eigenvalues {eigen})"


def test_perlin_noise_is_smooth_seeded_and_works_for_any_shape() -> None:
    noise = perlin_noise((50, 70), (3, 5), 0)
    assert noise.shape == (50, 70) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.5 and noise.std() > 0.1
    assert np.array_equal(noise, perlin_noise((50, 70), (3, 5), 0))
    assert not np.array_equal(noise, perlin_noise((50, 70), (3, 5), 1))
    # Smooth and continuous across lattice cells (about 14 px here): neighbours differ far less than
    # independent samples would (about 1.1x the mean deviation), and nowhere jump.
    for axis in (0, 1):
        steps = np.abs(np.diff(noise, axis=axis))
        assert steps.mean() < 0.35 * np.abs(noise - noise.mean()).mean()
        assert steps.max() < 0.25
    fractal = fractal_perlin_noise((64, 64), (2, 2), 0, octaves=4)
    assert fractal.shape == (64, 64) and np.abs(fractal).max() <= 1.5


def test_foreground_mask_finds_an_object_on_a_plain_tray_and_all_of_a_texture() -> None:
    image, disc = _disc()
    estimate = foreground_mask(image)
    iou = (estimate & disc).sum() / (estimate | disc).sum()
    assert iou > 0.9
    assert foreground_mask(_texture()).all(), "a full-frame texture is all object"


def test_unseeded_generators_are_refused() -> None:
    with pytest.raises(TypeError):
        as_generator(None)
    generator = np.random.default_rng(0)
    assert as_generator(generator) is generator


def test_mismatched_foreground_and_reversed_ranges_are_errors() -> None:
    image, _ = _disc()
    with pytest.raises(ValueError, match="foreground"):
        cutpaste_patch(image, 0, foreground=np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="area_ratio"):
        cutpaste_patch(image, 0, area_ratio=(0.2, 0.1))
