"""Multi-turn conversations about one query image, for `iadgpt chat` and the reasoning benchmark.

The first user turn is exactly the inspection prompt of `few_shot_messages` (normal references,
optional abnormal references, the query image, then the first question), so a conversation starts
from the layout the model was trained on; later user turns are text only, and every earlier answer
is appended as an assistant turn before the next question. The images therefore appear once, in the
first turn, and are re-encoded with each prompt (no cache is kept between turns: a turn is one
`generate` call, which keeps batching across conversations simple).

Replies of several conversations are generated in one left-padded batch, each conversation with its
own references and history, with the same image roles as `Inspector.batch_inputs` (normal
references compressible, the query never), so exemplar compression applies to chat too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY
from .model.prompts import generation_inputs
from .model.prompts import few_shot_messages


@dataclass
class Dialogue:
    """One query image, its references, and the (question, answer) turns so far."""

    query: Image.Image
    normals: list[Image.Image] = field(default_factory=list)
    abnormal: list[Image.Image] = field(default_factory=list)
    """Optional defective examples of the same product, shown between the normals and the query."""
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict]:
        """Chat messages asking `question` next: the images in the first user turn only."""
        first_question, first_answer = self.turns[0] if self.turns else (question, None)
        messages = few_shot_messages(len(self.normals), first_question, answer=first_answer,
                                     num_abnormal_references=len(self.abnormal))
        for asked, answered in self.turns[1:]:
            messages.append({"role": "user", "content": [{"type": "text", "text": asked}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        if self.turns:
            messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        return messages

    def images(self) -> list[Image.Image]:
        """The images in prompt order (as `few_shot_messages` places them)."""
        return [*self.normals, *self.abnormal, self.query]

    def image_roles(self) -> list[int]:
        return [ROLE_EXEMPLAR] * len(self.normals) + [ROLE_OTHER] * len(self.abnormal) + [ROLE_QUERY]


def dialogue_inputs(processor, dialogues: list[Dialogue], questions: list[str]):
    """Left-padded processor inputs asking each dialogue its next question (answer position last)."""
    if len(dialogues) != len(questions):
        raise ValueError(f"{len(dialogues)} dialogues but {len(questions)} questions")
    return generation_inputs(processor, [(dialogue.messages(question), dialogue.images(), dialogue.image_roles())
                                         for dialogue, question in zip(dialogues, questions)])


@torch.inference_mode()
def reply(model, processor, dialogues: list[Dialogue], questions: list[str], max_new_tokens: int = 256,
          streamer=None, min_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of every dialogue to its next question; each (question, answer) is appended.

    `streamer` (a transformers TextStreamer) receives the tokens as they are generated: pass one
    only with a single dialogue. `min_new_tokens` forbids stopping earlier (benchmarks use it so
    that a model that happens to stop early does not look faster).
    """
    if not dialogues:
        return []
    inputs = dialogue_inputs(processor, dialogues, questions).to(model.device)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if min_new_tokens:
        options["min_new_tokens"] = min_new_tokens
    if streamer is not None:
        options["streamer"] = streamer
    generated = model.generate(**inputs, **options)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    answers = [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    for dialogue, question, answer in zip(dialogues, questions, answers):
        dialogue.turns.append((question, answer))
    return answers
