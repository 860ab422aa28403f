"""Turning training records into model batches, through the checkpoint's own processor.

The processor (chat template, image resizing, `<|image_pad|>` expansion, `mm_token_type_ids`) is
the one inference uses, so training sees exactly the token layout evaluation will. Labels cover
the assistant turns only (their text and closing `<|im_end|>`), sequences are never cut (an image
span cut in half breaks the features/tokens count: over-long records are filtered beforehand by
`record_length` and reported), and the query's defect mask travels along for the pixel loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.records import StageInfo, TrainingRecord
from ..data.samples import load_image, load_mask
from ..model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY

ROLE_IDS = {"exemplar": ROLE_EXEMPLAR, "query": ROLE_QUERY, "other": ROLE_OTHER}
# Tasks whose query image gets a pixel map and, with a mask (or as a normal image), the pixel loss.
PIXEL_TASKS = ("detection", "localization")


def assistant_label_mask(input_ids: torch.Tensor, assistant_prefix: list[int], end_id: int) -> torch.Tensor:
    """[B, L] bool: tokens of assistant turns, from after `<|im_start|>assistant\\n` to `<|im_end|>`."""
    labelled = torch.zeros_like(input_ids, dtype=torch.bool)
    m = len(assistant_prefix)
    prefix = torch.tensor(assistant_prefix, device=input_ids.device)
    for b, row in enumerate(input_ids):
        starts = (row.unfold(0, m, 1) == prefix).all(-1).nonzero().flatten().tolist()
        for start in starts:
            position = start + m
            while position < row.shape[0]:
                labelled[b, position] = True
                if row[position] == end_id:
                    break
                position += 1
    return labelled


@dataclass
class RecordCollator:
    """Callable batch builder for `torch.utils.data.DataLoader(collate_fn=...)`.

    Takes record dicts (as `datasets` yields them) and returns model inputs plus `labels`,
    `image_roles`, `pixel_masks` and, for a batch without images, a dummy image.
    """

    processor: Any
    info: StageInfo
    pixel_loss_on_normals: bool = True
    """Give normal query images an all-zero mask, so the pixel loss also teaches "nothing here"."""
    _dummy: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        self.assistant_prefix = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def load_images(self, record: TrainingRecord) -> list[Image.Image]:
        return [load_image(self.info.image_path(record, path)) for path in record.images]

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        records = [TrainingRecord.from_dict(dict(row), where=f"record {row.get('id')}") for row in rows]
        texts = [self.processor.apply_chat_template(r.messages, tokenize=False) for r in records]
        images_per_record = [self.load_images(r) for r in records]
        images = [image for group in images_per_record for image in group]
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        labelled = assistant_label_mask(batch["input_ids"], self.assistant_prefix, self.end_id)
        batch["labels"] = batch["input_ids"].masked_fill(~labelled | (batch["attention_mask"] == 0), -100)
        if images:
            batch["image_roles"] = torch.tensor([ROLE_IDS[role] for r in records for role in r.image_roles])
            masks = [self.query_mask(r, group) for r, group in zip(records, images_per_record)]
            if any(m is not None for m in masks):
                batch["pixel_masks"] = masks
        else:
            batch.update(self.dummy_image())
        return dict(batch)

    def query_mask(self, record: TrainingRecord, images: list[Image.Image]) -> torch.Tensor | None:
        """The query's defect mask at the query image's size (zeros for a normal query), or None."""
        if record.task not in PIXEL_TASKS or "query" not in record.image_roles:
            return None
        query = images[record.image_roles.index("query")]
        if record.mask:
            return torch.from_numpy(load_mask(self.info.image_path(record, record.mask), query.size)).float()
        if record.label == 0 and self.pixel_loss_on_normals:
            return torch.zeros(query.size[1], query.size[0])
        return None

    def dummy_image(self) -> dict[str, torch.Tensor]:
        if self._dummy is None:
            side = self.processor.image_processor.patch_size * self.processor.image_processor.merge_size
            blank = Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8))
            encoded = self.processor.image_processor(images=[blank], return_tensors="pt")
            self._dummy = {"dummy_pixel_values": encoded["pixel_values"],
                           "dummy_image_grid_thw": encoded["image_grid_thw"]}
        return dict(self._dummy)


def record_length(processor, record: TrainingRecord, info: StageInfo) -> int:
    """Tokens the record takes, without decoding its images (only their headers are read)."""
    text = processor.apply_chat_template(record.messages, tokenize=False)
    image_processor = processor.image_processor
    merge = image_processor.merge_size
    image_tokens = 0
    for path in record.images:
        with Image.open(info.image_path(record, path)) as image:
            width, height = image.size
        patches = image_processor.get_number_of_image_patches(height, width, {})
        image_tokens += patches // (merge * merge) - 1  # the placeholder itself is one token already
    return len(processor.tokenizer.encode(text, add_special_tokens=False)) + image_tokens
