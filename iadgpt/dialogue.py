"""Multi-turn conversations about one query image, for `iadgpt chat` and the reasoning benchmark.

The first user turn is exactly the inspection prompt of `few_shot_messages` (normal references,
optional abnormal references, the query image, then the first question), so a conversation starts
from the layout the model was trained on; later user turns are text only, and every earlier answer
is appended as an assistant turn before the next question. The images therefore appear once, in the
first turn.

Two ways to answer. `reply` answers several conversations in one left-padded batch, each with its
own references and history, re-reading every prompt (one `generate` call per turn): what the
reasoning benchmark does. `KeptConversation` answers one conversation and keeps its key/value cache
between turns, so each question feeds only the new turn's tokens: what `iadgpt chat` does. Both use
the same image roles as `Inspector.batch_inputs` (normal references compressible, the query
never), so exemplar compression applies to chat too.
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
    inputs = dialogue_inputs(processor, dialogues, questions)
    answers = [text.strip() for text in generate_text(model, processor, inputs, max_new_tokens, streamer=streamer,
                                                      min_new_tokens=min_new_tokens)]
    for dialogue, question, answer in zip(dialogues, questions, answers):
        dialogue.turns.append((question, answer))
    return answers


@torch.inference_mode()
def generate_text(model, processor, inputs, max_new_tokens: int = 256, streamer=None,
                  min_new_tokens: int | None = None) -> list[str]:
    """Greedy continuations of a left-padded batch (`generation_inputs`), decoded as generated
    (special tokens dropped, spaces not cleaned up, not stripped)."""
    inputs = inputs.to(model.device)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if min_new_tokens:
        options["min_new_tokens"] = min_new_tokens
    if streamer is not None:
        options["streamer"] = streamer
    generated = model.generate(**inputs, **options)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class KeptConversation:
    """One dialogue whose key/value cache is kept between turns.

    The first question runs the whole first prompt (images included) once; the answer is decoded
    greedily on its cache (`continue_greedy`). Every later question feeds only what the chat template
    adds after the last answer (its end, the question, the assistant's start) on the same cache. The
    model thus sees exactly the tokens it generated, where re-reading would re-tokenize the answer's
    text. `ids` are all the tokens fed so far, uncompressed.
    """

    END_OF_TURN = "<|im_end|>"

    def __init__(self, model, processor, dialogue: Dialogue):
        self.model, self.processor, self.dialogue = model, processor, dialogue
        self.cache = None
        self.mask: torch.Tensor | None = None  # the whole sequence's attention mask, fed tokens only
        self.ids: torch.Tensor | None = None
        self.first_inputs = None
        self.unfed: int | None = None  # the last answer token: generated, not yet in the cache
        self.state = None  # the model's cache state after this conversation's last step

    def _next_turn_ids(self, question: str) -> list[int]:
        """The tokens after the last answer's content that ask `question` (as the chat template renders
        them), with the last answer token first when generation stopped before the end of turn."""
        template = self.processor.apply_chat_template
        messages = self.dialogue.messages(question)
        whole = template(messages, tokenize=False, add_generation_prompt=True)
        before = template(messages[:-1], tokenize=False)
        cut = before.rindex(self.END_OF_TURN)
        if whole[:cut] != before[:cut]:
            raise RuntimeError("the chat template renders a conversation's history differently once it grows")
        ids = self.processor.tokenizer(whole[cut:], add_special_tokens=False)["input_ids"]
        end = self.processor.tokenizer.convert_tokens_to_ids(self.END_OF_TURN)
        return ids if self.unfed == end else [self.unfed, *ids]

    @torch.inference_mode()
    def ask(self, question: str, max_new_tokens: int = 256, streamer=None,
            stop_token_ids: list[int] | None = None) -> str:
        """The greedy answer to `question`, appended to the dialogue's turns; streamed to `streamer`.
        `stop_token_ids`: as `continue_greedy` ([] never stops early: benchmarks force the length).
        Interrupted (KeyboardInterrupt), the conversation stays as it was before the question."""
        model, device = self.model, self.model.device
        kept = self.cache.get_seq_length() if self.cache is not None else 0
        try:
            if self.cache is None:
                inputs = dialogue_inputs(self.processor, [self.dialogue], [question]).to(device)
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                mask, ids, self.first_inputs = inputs["attention_mask"], inputs["input_ids"], inputs
            else:
                model.restore_cache_state(self.state)  # another prompt may have run in between
                turn = torch.tensor([self._next_turn_ids(question)], device=device)
                mask = torch.cat([self.mask, torch.ones_like(turn)], dim=1)
                ids = torch.cat([self.ids, turn], dim=1)
                out = model.forward_on_cache(turn, mask, self.cache)
            tokens = model.continue_greedy(out, mask, max_new_tokens, stop_token_ids, streamer=streamer)
        except KeyboardInterrupt:
            if self.cache is not None and self.cache.get_seq_length() > kept:
                self.cache.crop(kept - self.cache.get_seq_length())  # drop what this question fed
            raise
        fed = tokens[:, :-1]  # continue_greedy fed every token but the last
        self.cache, self.unfed, self.state = out.cache, int(tokens[0, -1]), model.cache_state()
        self.mask = torch.cat([mask, torch.ones_like(fed)], dim=1)
        self.ids = torch.cat([ids, fed], dim=1)
        answer = self.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
        self.dialogue.turns.append((question, answer))
        return answer
