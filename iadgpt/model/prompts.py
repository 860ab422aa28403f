"""The few-shot prompt: k normal exemplars, the query image, then the question (IADGPT Eq. 3)."""

from __future__ import annotations

from PIL import Image

from .settings import DetectionQuestion


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


def detection_inputs(processor, exemplars: list[list[Image.Image]], queries: list[Image.Image],
                     question: DetectionQuestion | None = None):
    """Left-padded processor inputs for scoring a batch of queries, each with its own exemplars."""
    question = question or DetectionQuestion()
    texts, images = [], []
    for refs, query in zip(exemplars, queries, strict=True):
        messages = few_shot_messages(len(refs), question.text)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.extend([*refs, query])
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, return_tensors="pt", padding=True)
