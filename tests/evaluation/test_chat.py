"""`iadgpt chat` driven through stdin: the score line first, then one answer line per question."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from iadgpt import chat


def chat_command() -> list[str]:
    """`iadgpt chat` once the CLI lists the sub-command; the module entry point otherwise."""
    from iadgpt import cli

    if "chat" in getattr(cli, "COMMANDS", {}):
        return [sys.executable, "-m", "iadgpt.cli", "chat"]
    return [sys.executable, "-m", "iadgpt.chat"]


@pytest.fixture()
def images(tmp_path, random_image):
    paths = {}
    for name in ("normal_a", "normal_b", "query"):
        paths[name] = tmp_path / f"{name}.png"
        random_image(112, 96).save(paths[name])
    return paths


SCORE_LINE = re.compile(
    r"^anomaly score: (\d\.\d{4}) \((defective|normal) at threshold 0\.5; 2 normal reference\(s\)\)$")


def test_chat_through_stdin_answers_each_line(tiny_checkpoint, images, tmp_path):
    heatmap = tmp_path / "maps" / "query_heatmap.png"
    command = chat_command() + ["--model", str(tiny_checkpoint), "--normal", str(images["normal_a"]),
                                str(images["normal_b"]), "--query", str(images["query"]), "--heatmap", str(heatmap),
                                "--max-new-tokens", "6"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, input="What is wrong with it?\n\nWhere is the defect?\n", capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout  # the score, then one line per question (the blank line is skipped)
    score = SCORE_LINE.match(lines[0])
    assert score and 0.0 <= float(score.group(1)) <= 1.0, lines[0]
    assert all(line.isprintable() for line in lines[1:])
    with Image.open(heatmap) as overlay:
        assert overlay.size == (96, 112)


def test_exit_command_ends_and_history_keeps_turns(tiny_checkpoint, images, monkeypatch):
    sessions = []
    original = chat.ChatSession.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(chat.ChatSession, "__init__", remember)
    args = chat.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_checkpoint), "--normal", str(images["normal_a"]), "--query", str(images["query"]),
         "--max-new-tokens", "4"])
    out = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("First?\nSecond?\n/exit\nNever asked?\n"), stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("anomaly score: ") and len(lines) == 3
    [session] = sessions
    assert [q for q, _ in session.dialogue.turns] == ["First?", "Second?"]
    assert [chat.plain_line(a) for _, a in session.dialogue.turns] == lines[1:]
    # Later turns carry the history; the images stay in the first user turn only.
    messages = session.dialogue.messages("Third?")
    images_per_turn = [sum(part.get("type") == "image" for part in m["content"]) for m in messages]
    assert images_per_turn == [2, 0, 0, 0, 0] and messages[-1]["content"][0]["text"] == "Third?"


def test_unreadable_image_is_named(tiny_checkpoint, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    args = chat.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_checkpoint), "--normal", str(broken), "--query", str(images["query"])])
    with pytest.raises(SystemExit, match=f"iadgpt chat: {broken}: cannot decode"):
        chat.run(args, stdin=io.StringIO(""), stdout=io.StringIO())


def kept_conversation(tiny_checkpoint, random_image):
    from iadgpt.dialogue import Dialogue, KeptConversation
    from iadgpt.inspection import Inspector

    inspector = Inspector.from_pretrained(tiny_checkpoint)
    dialogue = Dialogue(random_image(), [random_image(), random_image()])
    return inspector, KeptConversation(inspector.model, inspector.processor, dialogue)


def test_a_kept_conversation_answers_as_generate_on_every_token_it_fed(tiny_checkpoint, random_image):
    """Turn 3's answer on the kept cache equals generate() run on the whole sequence of tokens the
    conversation fed (the first prompt's images included), compression on."""
    import torch

    inspector, conversation = kept_conversation(tiny_checkpoint, random_image)
    conversation.ask("Is there a defect?", max_new_tokens=6)
    conversation.ask("Where is it?", max_new_tokens=6)
    fed_before = conversation.ids.shape[1] + len(conversation._next_turn_ids("What caused it?"))
    answer = conversation.ask("What caused it?", max_new_tokens=6)
    answer_tokens = conversation.ids[0, fed_before:].tolist() + [conversation.unfed]
    first = conversation.first_inputs
    whole = conversation.ids[:, :fed_before]
    types = torch.nn.functional.pad(first["mm_token_type_ids"], (0, whole.shape[1] - first["input_ids"].shape[1]))
    with torch.no_grad():
        reference = inspector.model.generate(
            input_ids=whole, attention_mask=torch.ones_like(whole), pixel_values=first["pixel_values"],
            image_grid_thw=first["image_grid_thw"], mm_token_type_ids=types, image_roles=first["image_roles"],
            max_new_tokens=6, do_sample=False)
    assert reference[0, whole.shape[1]:].tolist() == answer_tokens
    assert answer == inspector.processor.decode(answer_tokens, skip_special_tokens=True).strip()
    assert [q for q, _ in conversation.dialogue.turns] == ["Is there a defect?", "Where is it?", "What caused it?"]


def test_an_interrupted_answer_leaves_the_conversation_as_it_was(tiny_checkpoint, random_image):
    class StopAfterTwo:
        def __init__(self):
            self.seen = 0

        def put(self, token):
            self.seen += 1
            if self.seen == 2:
                raise KeyboardInterrupt

        def end(self):
            pass

    inspector, conversation = kept_conversation(tiny_checkpoint, random_image)
    conversation.ask("Is there a defect?", max_new_tokens=5)
    length = conversation.cache.get_seq_length()
    with pytest.raises(KeyboardInterrupt):
        conversation.ask("Where is it?", max_new_tokens=5, streamer=StopAfterTwo())
    assert conversation.cache.get_seq_length() == length and len(conversation.dialogue.turns) == 1
    inspector.inspect([random_image()], [[random_image()]])  # another prompt in between
    after = conversation.ask("Where is it?", max_new_tokens=5)

    _, uninterrupted = kept_conversation(tiny_checkpoint, random_image)
    uninterrupted.dialogue.query, uninterrupted.dialogue.normals = conversation.dialogue.query, conversation.dialogue.normals
    uninterrupted.ask("Is there a defect?", max_new_tokens=5)
    assert uninterrupted.ask("Where is it?", max_new_tokens=5) == after
