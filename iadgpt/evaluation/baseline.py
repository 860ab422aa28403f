"""A training-free few-shot baseline: PatchCore-style nearest-exemplar patch matching.

PatchCore (Roth et al. 2022) scores each query patch by its distance to the nearest patch in a
memory bank built from normal images, and the image by its worst patch. Without downloadable
pretrained CNN weights, the patch descriptors here are computed from the pixels: at two scales,
the patch's mean colour and its contrast-normalised, down-sampled appearance. The memory bank is
the k normal references of the query's product: the same references the model sees, read from
the same manifest, so the comparison is like for like.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def patch_descriptors(image: Image.Image, size: int = 128, patch: int = 16, stride: int = 8) -> np.ndarray:
    """[gh, gw, d] descriptors of overlapping patches of the image resized to `size` x `size`."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    windows = np.lib.stride_tricks.sliding_window_view(pixels, (patch, patch, 3))[::stride, ::stride, 0]
    gh, gw = windows.shape[:2]
    mean = windows.mean(axis=(2, 3))  # [gh, gw, 3] colour
    # appearance: the patch pooled to 4 x 4, contrast-normalised, so texture and edges count
    pooled = windows.reshape(gh, gw, 4, patch // 4, 4, patch // 4, 3).mean(axis=(3, 5))
    centred = pooled - pooled.mean(axis=(2, 3), keepdims=True)
    appearance = centred.reshape(gh, gw, -1) / (np.linalg.norm(centred.reshape(gh, gw, -1), axis=-1,
                                                               keepdims=True) + 0.1)
    return np.concatenate([mean * 2.0, appearance], axis=-1).astype(np.float32)


def nearest_patch_distance(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[gh, gw] distance of each query patch to its nearest neighbour in the bank [n, d]."""
    flat = query.reshape(-1, query.shape[-1])
    # |q - b|^2 = |q|^2 - 2 q.b + |b|^2, in chunks to bound memory
    distances = np.empty(len(flat), dtype=np.float32)
    bank_sq = (bank ** 2).sum(-1)
    for start in range(0, len(flat), 1024):
        chunk = flat[start:start + 1024]
        d2 = (chunk ** 2).sum(-1)[:, None] - 2 * chunk @ bank.T + bank_sq[None, :]
        distances[start:start + 1024] = np.sqrt(np.maximum(d2.min(axis=1), 0))
    return distances.reshape(query.shape[:2])


class NearestPatchBaseline:
    """Score and map a query against k normal references; k = 0 gives a constant (chance) result."""

    def __init__(self, size: int = 128, patch: int = 16, stride: int = 8):
        self.size, self.patch, self.stride = size, patch, stride

    def memory_bank(self, references: list[Image.Image]) -> np.ndarray:
        """[n, d] descriptors of every patch of the references (reusable for all queries of a product)."""
        return np.concatenate([descriptors.reshape(-1, descriptors.shape[-1]) for descriptors in
                               (patch_descriptors(r, self.size, self.patch, self.stride) for r in references)])

    def __call__(self, query: Image.Image, references: list[Image.Image],
                 bank: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """(image score, [H, W] anomaly map at the query's resolution); `bank`: `memory_bank(references)`
        computed beforehand."""
        width, height = query.size
        if not references:
            return 0.0, np.zeros((height, width), dtype=np.float32)
        features = patch_descriptors(query, self.size, self.patch, self.stride)
        bank = self.memory_bank(references) if bank is None else bank
        grid = nearest_patch_distance(features, bank)
        full = np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), dtype=np.float32)
        return float(grid.max()), full


class NearestPatchInspector:
    """The baseline behind `Inspector.inspect`'s interface, so `run_detection(..., inspector=...)`
    scores it on exactly the model's manifest, with the same cache, metrics and reports.

    The benchmark's cache keeps a coarse map per query and upsamples it bilinearly; the baseline's
    map (already a bilinear upsampling of its patch grid) is stored area-averaged to `grid` x `grid`,
    finer than its own patch grid, so nothing it localises is lost.
    """

    def __init__(self, baseline: NearestPatchBaseline | None = None, grid: int = 32, batch_size: int = 8):
        self.baseline = baseline or NearestPatchBaseline()
        self.grid = grid
        self.batch_size = batch_size
        self._banks: dict[str, np.ndarray] = {}

    def bank(self, references: list[Image.Image]) -> np.ndarray:
        """The references' memory bank, computed once per set of references (keyed by their pixels:
        the benchmark passes the same references for every query of a category and run)."""
        import hashlib

        digest = hashlib.sha1()
        for image in references:
            digest.update(repr(image.size).encode())
            digest.update(image.tobytes())
        key = digest.hexdigest()
        if key not in self._banks:
            if len(self._banks) > 64:
                self._banks.clear()
            self._banks[key] = self.baseline.memory_bank(references)
        return self._banks[key]

    def inspect(self, queries: list[Image.Image], normals: list[list[Image.Image]], abnormal=None,
                with_text: bool = False, max_new_tokens: int = 0):
        from ..inspection import InspectionResult

        if with_text:
            raise ValueError("the nearest-patch baseline scores and maps images; it has no text answer")
        results = []
        for query, references in zip(queries, normals, strict=True):
            score, full = self.baseline(query, references, self.bank(references) if references else None)
            coarse = np.asarray(Image.fromarray(full.astype(np.float32), mode="F").resize(
                (self.grid, self.grid), Image.Resampling.BOX), dtype=np.float32)
            results.append(InspectionResult(score=score, anomaly_map=full, token_map=coarse))
        return results
