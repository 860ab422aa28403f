"""The conversations of every training task: one place for the words the model is trained on.

Stage-3 detection uses exactly the prompt inference uses (`few_shot_messages` with the model's
detection question), so the Yes/No position the image score reads is the one training taught.
Regions are written in Qwen2.5-VL's grounding format: a JSON list of
`{"bbox_2d": [x1, y1, x2, y2], "label": ...}` in absolute pixels of the image as the processor
resizes it (multiples of 28 between min_pixels and max_pixels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..model.checkpoint import QWEN2_5_VL_MAX_PIXELS, QWEN2_5_VL_MIN_PIXELS, check_pixel_limits, pixel_limits
from ..model.prompts import few_shot_messages
from ..model.settings import DetectionQuestion

CAPTION_QUESTIONS = (
    "Describe the shape, material, structure and surface quality of this industrial product.",
    "What industrial product is shown? Describe its appearance in detail.",
    "Describe this product as a quality inspector would.",
)
LOCALIZATION_QUESTION = "Where is the defect in the query image? Answer with bounding boxes."
REASONING_QUESTION = "Compare the query image with the normal examples. Describe the defect, if any, and its likely cause."


@dataclass(frozen=True)
class ResizeRule:
    """How the target processor resizes images (Qwen2.5-VL's smart_resize), for box coordinates.

    The defaults are the released Qwen2.5-VL processor's; `of_processor` reads a loaded one's. A
    stage folder records the rule its boxes were computed with (`StageInfo.pixels`), and training
    refuses a processor that resizes otherwise.
    """

    factor: int = 28
    """Side that both resized sides are multiples of: patch size x spatial merge (Qwen2.5-VL: 28)."""
    min_pixels: int = QWEN2_5_VL_MIN_PIXELS
    """Smallest image area after resizing."""
    max_pixels: int = QWEN2_5_VL_MAX_PIXELS
    """Largest image area after resizing."""

    def __post_init__(self):
        check_pixel_limits(self.min_pixels, self.max_pixels)

    @classmethod
    def of_processor(cls, processor) -> "ResizeRule":
        """The rule a loaded processor (or image processor) resizes by."""
        image_processor = getattr(processor, "image_processor", processor)
        return cls(image_processor.patch_size * image_processor.merge_size, *pixel_limits(image_processor))

    def size(self, width: int, height: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h


def mask_boxes(mask: np.ndarray, rule: ResizeRule, label: str, min_area: int = 4) -> list[dict]:
    """One box per 8-connected region of the mask, in the resized image's pixels."""
    height, width = mask.shape
    new_w, new_h = rule.size(width, height)
    regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = []
    for slices in ndimage.find_objects(regions):
        ys, xs = slices
        if (ys.stop - ys.start) * (xs.stop - xs.start) < min_area:
            continue
        box = [round(xs.start * new_w / width), round(ys.start * new_h / height),
               round(xs.stop * new_w / width) - 1, round(ys.stop * new_h / height) - 1]
        boxes.append({"bbox_2d": box, "label": label})
    return boxes


def boxes_text(boxes: list[dict]) -> str:
    return json.dumps(boxes)


def readable(defect_type: str) -> str:
    return defect_type.replace("_", " ")


def user(*content: dict) -> dict:
    return {"role": "user", "content": list(content)}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}


# -- stage 1 -------------------------------------------------------------------------------------
def caption_messages(question: str, caption: str) -> list[dict]:
    return [user(IMAGE, text(question)), assistant(caption)]


# -- stage 2 -------------------------------------------------------------------------------------
def odd_one_out_messages(group_size: int, odd_index: int, defect_type: str) -> list[dict]:
    content = [text(f"These {group_size} images show the same product.")]
    for i in range(group_size):
        content += [text(f" Image {i + 1}:"), IMAGE]
    content.append(text(" Which image is different from the others? Answer with its number."))
    return [user(*content), assistant(f"Image {odd_index + 1}. It shows a {readable(defect_type)} defect.")]


def difference_messages(boxes: list[dict]) -> list[dict]:
    question = (" Compare the two images of the same product. Are there regions where the second image "
                "differs from the first? If so, give their bounding boxes in the second image.")
    answer = f"Yes. {boxes_text(boxes)}" if boxes else "No, the two images show no difference."
    return [user(text("Image 1:"), IMAGE, text(" Image 2:"), IMAGE, text(question)), assistant(answer)]


def irregular_region_messages(boxes: list[dict]) -> list[dict]:
    question = "Is there an irregular region on this product? If so, give its bounding boxes."
    answer = f"Yes. {boxes_text(boxes)}" if boxes else "No, the product surface is regular."
    return [user(IMAGE, text(question)), assistant(answer)]


# -- stage 3 -------------------------------------------------------------------------------------
def detection_messages(shots: int, defective: bool, defect_type: str, question: DetectionQuestion,
                       num_abnormal: int = 0) -> list[dict]:
    says_defect = "Yes" if question.defect_answer == "Yes" else "No"
    says_normal = "No" if says_defect == "Yes" else "Yes"
    answer = (f"{says_defect}, the query image has a {readable(defect_type)} defect." if defective
              else f"{says_normal}, the query image is normal.")
    return few_shot_messages(shots, question.text, answer=answer, num_abnormal_references=num_abnormal)


def localization_messages(shots: int, boxes: list[dict]) -> list[dict]:
    answer = boxes_text(boxes) if boxes else "There is no defect in the query image."
    return few_shot_messages(shots, LOCALIZATION_QUESTION, answer=answer)


def reasoning_messages(shots: int, answer: str, question: str = REASONING_QUESTION) -> list[dict]:
    return few_shot_messages(shots, question, answer=answer)
