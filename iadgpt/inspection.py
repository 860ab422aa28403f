"""The inspection API: a query image and k normal references in, score, heatmap and answer out.

One forward pass gives both the image score (Yes/No logits) and the pixel map (attention rows);
text generation runs only when asked. A reference set (its images and the prompt up to the query)
is encoded once, `ReferencePrefix`, and kept in a small LRU cache keyed by the images' content: every
query of that set then runs only its own image and question, batched with the other queries of
the same set and size. So a production line and a benchmark use the same call.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.samples import image_digest
from .model.checkpoint import device_and_dtype, load_model, load_processor
from .model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY
from .model.prompts import few_shot_messages, generation_inputs, split_before_query
from .model.settings import DetectionQuestion


@dataclass
class InspectionResult:
    """What the model says about one query image."""

    score: float
    """Probability that the query is defective: softmax over the "Yes"/"No" answer logits (with the
    setting `residuals.image_score_map_weight`, fused with the anomaly map's maximum)."""
    anomaly_map: np.ndarray
    """[H, W] float32 in [0, 1] at the query's own resolution: p(anomalous) per pixel."""
    token_map: np.ndarray
    """[h, w] the same on the model's visual-token grid (before resizing)."""
    text: str | None = None
    """The model's free-text answer, when asked for."""


class Inspector:
    """Batched few-shot inspection with one IADGPT checkpoint.

    >>> inspector = Inspector.from_pretrained("runs/stage3")
    >>> [result] = inspector.inspect([query], [[normal_a, normal_b]])
    """

    def __init__(self, model, processor, batch_size: int = 4, question: DetectionQuestion | None = None,
                 reference_cache_size: int = 8):
        """`reference_cache_size`: reference sets whose encoded prefix is kept (least recently used
        goes first); 0 turns the cache off, so every batch runs whole prompts."""
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.question = question or model.iadgpt.detection_question
        self.reference_cache_size = reference_cache_size
        self._prefixes: OrderedDict[str, object] = OrderedDict()
        self.reference_cache_hits = 0
        self.reference_cache_misses = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None, dtype=None,
                        attn_implementation: str = "sdpa", iadgpt: dict | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, **kwargs) -> "Inspector":
        """Load a checkpoint onto `device` (None: the GPU when there is one, else the CPU) in the
        dtype `device_and_dtype` gives for it (bf16 on a GPU, fp32 on the CPU) unless `dtype` is set.
        `min_pixels` / `max_pixels`: the images' area limits after resizing (None: the checkpoint
        processor's, which training saved with the limits it trained at)."""
        device, device_dtype = device_and_dtype(device)
        processor = load_processor(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels)
        model = load_model(name_or_path, dtype=dtype or device_dtype, attn_implementation=attn_implementation,
                           iadgpt=iadgpt, processor=processor, device=device)
        return cls(model, processor, **kwargs)

    @torch.inference_mode()
    def inspect(self, queries: list[Image.Image], normals: list[list[Image.Image]],
                abnormal: list[list[Image.Image]] | None = None, with_text: bool = False,
                max_new_tokens: int = 64) -> list[InspectionResult]:
        """Score and map every query against its own normal references (and abnormal ones, as in NAGL).

        `normals[i]` are the k normal images of query i's product (k may be 0); `abnormal[i]`
        optional defective examples of the same product, shown between the normals and the query.
        """
        if len(normals) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(normals)} lists of normal references")
        abnormal = abnormal or [[] for _ in queries]
        if not self.reference_cache_size:
            results: list[InspectionResult] = []
            for start in range(0, len(queries), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                results.extend(self._inspect_batch(queries[chunk], normals[chunk], abnormal[chunk], with_text,
                                                   max_new_tokens))
            return results
        # Queries of one reference set and one size share a prefix and a batch.
        digests: dict = {}
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, (query, refs, bad) in enumerate(zip(queries, normals, abnormal, strict=True)):
            key = (self._reference_key(refs, bad, digests), query.size)
            groups.setdefault(key, []).append(i)
        found: dict[int, InspectionResult] = {}
        for (key, _), members in groups.items():
            prefix = self._reference_prefix(key, normals[members[0]], abnormal[members[0]])
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = [queries[i] for i in chunk]
                found.update(zip(chunk, self._inspect_after_prefix(prefix, batch, with_text, max_new_tokens)))
        return [found[i] for i in range(len(queries))]

    def clear_reference_cache(self) -> None:
        """Forget every encoded reference set (they are encoded again when next used)."""
        self._prefixes.clear()

    def prompt(self, num_normals: int, num_abnormal: int) -> list[dict]:
        """The chat messages of a query with this many references."""
        return few_shot_messages(num_normals, self.question.text, num_abnormal_references=num_abnormal)

    def batch_inputs(self, queries, normals, abnormal):
        conversations = []
        for query, refs, bad in zip(queries, normals, abnormal, strict=True):
            roles = [ROLE_EXEMPLAR] * len(refs) + [ROLE_OTHER] * len(bad) + [ROLE_QUERY]
            conversations.append((self.prompt(len(refs), len(bad)), [*refs, *bad, query], roles))
        return generation_inputs(self.processor, conversations).to(self.model.device)

    def _reference_key(self, normals, abnormal, digests: dict) -> str:
        """The cache key of a reference set: the model's weights (`parameter_digest`) and the reference
        images' content, by role. `digests` memoises both within one `inspect` call (images by id)."""
        def digest(image) -> str:
            if id(image) not in digests:
                digests[id(image)] = image_digest(image)
            return digests[id(image)]

        if "weights" not in digests:
            digests["weights"] = parameter_digest(self.model)
        return hashlib.sha256(" ".join([digests["weights"], "normal", *map(digest, normals), "abnormal",
                                        *map(digest, abnormal)]).encode()).hexdigest()

    def _reference_prefix(self, key: str, normals, abnormal):
        """A reference set's encoded prefix and the prompt's text after it, from the cache or encoded
        now (and cached)."""
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            self.reference_cache_hits += 1
            return self._prefixes[key]
        self.reference_cache_misses += 1
        head, tail = split_before_query(self.processor.apply_chat_template(
            self.prompt(len(normals), len(abnormal)), tokenize=False, add_generation_prompt=True))
        images = [image.convert("RGB") for image in [*normals, *abnormal]]
        inputs = self.processor(text=[head], images=images or None, return_tensors="pt").to(self.model.device)
        roles = [ROLE_EXEMPLAR] * len(normals) + [ROLE_OTHER] * len(abnormal)
        prefix = self.model.encode_reference_prefix(inputs["input_ids"], inputs.get("pixel_values"),
                                                    inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids"),
                                                    roles)
        self._prefixes[key] = (prefix, tail)
        while len(self._prefixes) > self.reference_cache_size:
            self._prefixes.popitem(last=False)
        return prefix, tail

    def _inspect_after_prefix(self, reference, queries, with_text: bool = False,
                              max_new_tokens: int = 64) -> list[InspectionResult]:
        """Score and map queries of one size after a reference set's (prefix, prompt tail); the text
        answer continues from the scoring pass's cache."""
        prefix, tail = reference
        inputs = self.processor(text=[tail] * len(queries), images=[q.convert("RGB") for q in queries],
                                return_tensors="pt").to(self.model.device)
        out = self.model(**inputs, reference_prefix=prefix, pixel_maps=True, logits_to_keep=1, use_cache=with_text)
        texts = [None] * len(queries)
        if with_text:
            whole_mask = torch.ones(len(queries), len(prefix.input_ids) + inputs["input_ids"].shape[1],
                                    dtype=torch.long, device=self.model.device)
            tokens = self.model.continue_greedy(out, whole_mask, max_new_tokens)
            texts = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return self._results(queries, out, texts)

    def _inspect_batch(self, queries, normals, abnormal, with_text, max_new_tokens) -> list[InspectionResult]:
        inputs = self.batch_inputs(queries, normals, abnormal)
        out = self.model(**inputs, pixel_maps=True, logits_to_keep=1)
        texts = [None] * len(queries)
        if with_text:
            generated = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            texts = [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return self._results(queries, out, texts)

    def _results(self, queries, out, texts) -> list[InspectionResult]:
        scores = self.model.image_anomaly_score(out.logits[:, -1], out.pixel_scores).tolist()
        results = []
        for query, score, token_map, text in zip(queries, scores, out.pixel_scores, texts):
            width, height = query.size
            full = F.interpolate(token_map[None, None].float(), size=(height, width), mode="bilinear",
                                 align_corners=False)[0, 0]
            results.append(InspectionResult(score=score, anomaly_map=full.cpu().numpy().astype(np.float32),
                                            token_map=token_map.float().cpu().numpy(), text=text))
        return results


@torch.no_grad()
def parameter_digest(model, samples: int = 64) -> str:
    """A digest of a loaded model's weights: per parameter its name, shape and `samples` evenly strided
    values. Cheap enough to take at every `inspect` call, so a reference set encoded by other weights
    (the same model object, trained in between) is never reused."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        digest.update(picked.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with the map blended on top in a blue-to-red colour ramp (red = anomalous)."""
    values = np.clip(anomaly_map, 0.0, 1.0)
    ramp = np.stack([values, 1.0 - np.abs(values - 0.5) * 2, 1.0 - values], axis=-1)  # blue -> green -> red
    colour = Image.fromarray((ramp * 255).astype(np.uint8)).resize(image.size)
    return Image.blend(image.convert("RGB"), colour, alpha)
