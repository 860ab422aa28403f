"""The few-shot prompt: k normal exemplars, the query image, then the question (IADGPT Eq. 3)."""

from __future__ import annotations

import torch
from PIL import Image

from .settings import DetectionQuestion

VISION_START = "<|vision_start|>"
"""Qwen2.5-VL's token that opens every image in a prompt."""


def few_shot_messages(num_exemplars: int, question: str, answer: str | None = None,
                      num_abnormal_references: int = 0) -> list[dict]:
    """Chat messages in Qwen's format: exemplar images, the query image last, then the question.

    Images appear in the order: normal exemplars, abnormal references (optional, as in NAGL), query.
    """
    content: list[dict] = []
    if num_exemplars:
        noun = "image is a normal example" if num_exemplars == 1 else f"{num_exemplars} images are normal examples"
        content.append({"type": "text", "text": f"The first {noun} of this product:"})
        content.extend({"type": "image"} for _ in range(num_exemplars))
    if num_abnormal_references:
        content.append({"type": "text", "text": "Examples of defective products:"})
        content.extend({"type": "image"} for _ in range(num_abnormal_references))
    content.append({"type": "text", "text": "The query image:"})
    content.append({"type": "image"})
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def split_before_query(prompt: str) -> tuple[str, str]:
    """A chat-templated few-shot prompt cut before its last image (the query): the part a reference set
    shares with every query, and the query's own. The cut falls on a special token, which the
    tokenizer never merges across, so the two parts tokenize to the whole prompt's tokens."""
    cut = prompt.rfind(VISION_START)
    if cut < 0:
        raise ValueError("the prompt holds no image: there is no query image to cut before")
    return prompt[:cut], prompt[cut:]


def detection_inputs(processor, exemplars: list[list[Image.Image]], queries: list[Image.Image],
                     question: DetectionQuestion | None = None):
    """Left-padded processor inputs for scoring a batch of queries, each with its own exemplars."""
    question = question or DetectionQuestion()
    return generation_inputs(processor, [(few_shot_messages(len(refs), question.text), [*refs, query], None)
                                         for refs, query in zip(exemplars, queries, strict=True)])


def generation_inputs(processor, conversations: list[tuple[list[dict], list[Image.Image], list[int] | None]],
                      template_options: dict | None = None):
    """Left-padded model inputs for a batch of (chat messages, their images, image roles or None).

    Left padding puts every row's answer position last, where the image score is read and where
    generation starts; `image_roles` tells the model which images are compressible exemplars (None:
    the model's default, every image but the last of a prompt an exemplar). `template_options` are
    extra variables of the chat template (e.g. `add_vision_id`, which MMAD's official script sets).
    """
    texts, images, roles = [], [], []
    for messages, conversation_images, conversation_roles in conversations:
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                   **(template_options or {})))
        images.extend(image.convert("RGB") for image in conversation_images)
        roles.append(conversation_roles)
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    given = [r for r in roles if r is not None]
    if given and len(given) != len(roles):
        raise ValueError("image roles are given for some conversations of the batch and not for others")
    flat = [role for r in given for role in r]
    if flat:
        inputs["image_roles"] = torch.tensor(flat)
    return inputs
