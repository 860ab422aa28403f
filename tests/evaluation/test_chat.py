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
