"""`iadgpt inspect`: scores.csv and overlays for files, folders and globs; the threshold; bad input."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
from PIL import Image

from iadgpt.evaluation.inspect_cli import add_arguments, run


def inspect(*argv: str) -> int:
    return run(add_arguments(argparse.ArgumentParser(prog="iadgpt inspect")).parse_args(list(argv)))


@pytest.fixture()
def images(tmp_path, random_image):
    """3 normals in a folder; queries: two in line_a (one of them a JPEG), one in line_b named like one in line_a."""
    for folder in ("normals", "line_a", "line_b"):
        (tmp_path / folder).mkdir()
    for index in range(3):
        random_image(64).save(tmp_path / "normals" / f"n{index}.png")
    random_image(84, 112).save(tmp_path / "line_a" / "part1.png")
    random_image(56).save(tmp_path / "line_a" / "part2.jpg")
    random_image(70).save(tmp_path / "line_b" / "part1.png")
    (tmp_path / "line_b" / "notes.txt").write_text("not an image, ignored inside a folder")
    return tmp_path


def read_scores(out):
    with (out / "scores.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_scores_and_an_overlay_per_query(tiny_checkpoint, images, capsys):
    out = images / "out"
    assert inspect("--model", str(tiny_checkpoint), "--normals", str(images / "normals"),
                   "--query", str(images / "line_a" / "*"), str(images / "line_b"), "--out", str(out),
                   "--batch-size", "2") == 0
    rows = read_scores(out)
    assert [row["path"] for row in rows] == [str(images / "line_a" / "part1.png"), str(images / "line_a" / "part2.jpg"),
                                             str(images / "line_b" / "part1.png")]
    assert [row["overlay"] for row in rows] == ["overlays/part1.png", "overlays/part2.png", "overlays/part1_2.png"]
    for row in rows:
        score = float(row["score"])
        assert 0.0 <= score <= 1.0
        assert row["label"] == ("anomalous" if score >= 0.5 else "normal")
        assert Image.open(out / row["overlay"]).size == Image.open(row["path"]).size
    assert "Inspected 3 image(s) against 3 normal reference(s)" in capsys.readouterr().out


def test_the_threshold_sets_the_labels(tiny_checkpoint, images):
    for threshold, label in (("0", "anomalous"), ("1.01", "normal")):
        out = images / f"out_{threshold}"
        inspect("--model", str(tiny_checkpoint), "--normals", str(images / "normals" / "n0.png"),
                "--query", str(images / "line_a"), "--out", str(out), "--threshold", threshold)
        assert {row["label"] for row in read_scores(out)} == {label}


def test_bad_input_is_named(tiny_checkpoint, images, tmp_path):
    common = ["--model", str(tiny_checkpoint), "--normals", str(images / "normals"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--query '.*nothing_\\*.png': no image file there"):
        inspect(*common, "--query", str(images / "nothing_*.png"))
    broken = images / "line_a" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=f"{broken}: cannot decode image"):
        inspect(*common, "--query", str(broken))
    not_qwen = tmp_path / "bert"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match=f"{not_qwen} holds a 'bert' model"):
        inspect("--model", str(not_qwen), "--normals", str(images / "normals"), "--query", str(images / "line_b"),
                "--out", str(tmp_path / "o"))
