"""Reasoning benchmark: answer parsing, SBERT, prediction files, resume, bad input, GPT-score.

MMAD has its own tests (test_mmad.py); here only that the recipe runs both parts together.

The tiny random-weight model produces random text, so the end-to-end runs check mechanics (what is
asked, what is recorded, what is resumed); the metric values are checked with scripted answers.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadgpt.data.samples import DataError
from iadgpt.evaluation import reasoning
from iadgpt.evaluation.reasoning import (
    GPTScorer,
    parse_gpt_score,
    parse_yes_no,
    run_visa_dr,
    sbert_similarities,
)

RECIPE = Path(__file__).resolve().parents[2] / "eval" / "reasoning.py"
DETECTION_QUESTION = "Is there any defect or anomaly in the query image? Answer Yes or No."

# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sentence_model():
    return reasoning.load_sentence_model()


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from iadgpt.inspection import Inspector

    return Inspector.from_pretrained(tiny_checkpoint)


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)


VISA_DR_RECORDS = [
    {"image": "bottle/0.png", "category": "bottle", "anomaly": True,
     "questions": ["Is there any anomaly in the image?", "What is the defect?"],
     "answers": ["Yes, there is a crack.", "A crack near the neck of the bottle."]},
    {"image": "bottle/1.png", "category": "bottle", "anomaly": False},
    {"image": "bottle/2.png", "category": "bottle",
     "questions": ["Describe the object.", "What could cause such damage?", "How can it be avoided?"],
     "answers": ["A glass bottle seen from above.", "Impacts during transport.", "Pack bottles with padding."]},
]
QUESTIONS_PER_RUN = 2 + 1 + 3


@pytest.fixture()
def dataset(tmp_path):
    """VisA-D&R file + images, MVTec-layout normals for references, an MMAD file."""
    images = tmp_path / "images"
    for i in range(3):
        save_image(images / "bottle" / f"{i}.png", i)
    for i in range(2):
        save_image(tmp_path / "normals" / "bottle" / "train" / "good" / f"{i}.png", 10 + i)
    save_image(tmp_path / "normals" / "bottle" / "test" / "good" / "0.png", 20)
    data = tmp_path / "visa_dr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in VISA_DR_RECORDS))
    mmad = tmp_path / "mmad.json"
    mmad.write_text(json.dumps({
        "bottle/0.png": {"similar_templates": ["bottle/1.png"], "random_templates": ["bottle/2.png"], "conversation": [
            {"Question": "Is there any defect in the object?", "Options": {"A": "Yes.", "B": "No."}, "Answer": "A",
             "type": "Anomaly Detection"},
            {"Question": "What kind of defect?", "Options": ["Scratch.", "Dent.", "Crack."], "Answer": "C",
             "type": "Defect Classification"}]},
        "bottle/2.png": {"similar_templates": ["bottle/1.png"], "random_templates": [], "conversation": [
            {"Question": "Is there any defect in the object?", "Options": {"A": "Yes.", "B": "No."}, "Answer": "B",
             "type": "Anomaly Detection"}]},
    }))
    return {"root": tmp_path, "images": images, "data": data, "mmad": mmad, "normals": tmp_path / "normals"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scripted_reply(answers: dict[str, str], calls: list):
    """A stand-in for `iadgpt.dialogue.reply` answering by question text, recording every call."""

    def fake(model, processor, dialogues, questions, max_new_tokens=256, **kwargs):
        calls.append([(list(d.turns), q, len(d.normals)) for d, q in zip(dialogues, questions)])
        replies = [answers.get(q, "I cannot tell.") for q in questions]
        for dialogue, question, answer in zip(dialogues, questions, replies):
            dialogue.turns.append((question, answer))
        return replies

    return fake


def load_recipe():
    spec = importlib.util.spec_from_file_location("eval_reasoning_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# reading answers


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes", "yes"), ("yes.", "yes"), ("**Yes**, there is a scratch.", "yes"), ("No.", "no"),
    ("No, the bottle looks fine.", "no"), ("Nope", "no"),
    ("There is a crack on the rim.", "yes"), ("The product is damaged.", "yes"),
    ("There is no defect.", "no"), ("The image shows no anomaly.", "no"),
    ("No visible cracks, dents or other damage.", "no"), ("It does not have any defects.", "no"),
    ("The part isn't defective.", "no"), ("The surface is defect-free.", "no"), ("It looks normal.", "no"),
    ("It is not normal.", "yes"), ("There is no dent on the left, but a scratch on the right.", "yes"),
    ("The object appears flawless. However, a crack runs along the edge.", "yes"),
    ("A glass bottle seen from above.", None), ("", None), (None, None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_parse_yes_no_strict_reads_only_the_first_word():
    assert parse_yes_no("Yes, a crack.", strict=True) == "yes"
    assert parse_yes_no("There is a crack.", strict=True) is None


@pytest.mark.parametrize(("text", "expected"), [("7", 7.0), ("Score: 8.5/10", 8.5), ("10", 10.0), ("0", 0.0),
                                                ("42", None), ("none", None)])
def test_parse_gpt_score(text, expected):
    assert parse_gpt_score(text) == expected


# --------------------------------------------------------------------------------------------------
# SBERT


def test_sbert_identical_answer_scores_one_unrelated_lower(sentence_model):
    reference = "A crack runs along the neck of the glass bottle."
    identical, related, unrelated = sbert_similarities(
        sentence_model,
        [reference, "The bottle neck has a fracture.", "The stock market closed higher on Friday."],
        [reference] * 3)
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert unrelated < related < identical
    assert unrelated < 0.3


# --------------------------------------------------------------------------------------------------
# VisA-D&R end to end


def test_visa_dr_run_writes_predictions_and_results(tiny_model, sentence_model, dataset, tmp_path):
    out = tmp_path / "out"
    normals = reasoning.CategoryNormals("mvtec", dataset["normals"], shots=1, seed=0)
    summary = run_visa_dr(tiny_model.model, tiny_model.processor, dataset["data"], out,
                          image_root=dataset["images"], detection_question=DETECTION_QUESTION,
                          sentence_model=sentence_model, normals=normals, max_new_tokens=4, batch_size=2)
    lines = read_jsonl(out / "predictions.jsonl")
    assert len(lines) == QUESTIONS_PER_RUN
    for line in lines:
        assert {"image", "question", "reference", "response", "sbert"} <= set(line)
        assert isinstance(line["response"], str) and len(line["normals"]) == 1
    assert [(l["item"], l["turn"]) for l in lines] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert lines[2]["kind"] == "detection" and lines[2]["question"] == DETECTION_QUESTION
    assert lines[2]["reference"] == "No" and lines[2]["sbert"] is None
    assert all(-1.0 <= l["sbert"] <= 1.0 for l in lines if l["kind"] == "reasoning")
    counts = summary["counts"]
    assert counts["accuracy_questions"] == 2  # item 0's opening yes/no question and the detection item
    assert counts["sbert_questions"] == 4 and counts["sbert_all_questions"] == 5
    assert summary["references"]["bottle"][0].startswith(str(dataset["normals"]))
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["gpt_score"] is None


def test_recipe_writes_results_json(tiny_checkpoint, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    results = load_recipe().main([
        "--model", str(tiny_checkpoint), "--data", str(dataset["data"]), "--image-root", str(dataset["images"]),
        "--out", str(out), "--mmad", str(dataset["mmad"]), "--mmad-root", str(dataset["images"]),
        "--max-new-tokens", "4", "--mmad-max-new-tokens", "4", "--shots", "1"])
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(capsys.readouterr().out)
    assert {"sbert", "accuracy", "counts", "mmad"} <= set(written) and results["shots"] == 0
    assert written["counts"]["questions"] == QUESTIONS_PER_RUN
    assert written["mmad"]["counts"]["answers"] == 3 and written["mmad"]["references"] == "random_templates"
    assert written["mmad"]["columns"][:2] == ["Anomaly Detection", "Defect Classification"]
    assert len(read_jsonl(out / "mmad_predictions.jsonl")) == 3
    assert len(json.loads((out / "mmad_answers.json").read_text())) == 3


def test_metrics_from_scripted_answers(sentence_model, dataset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reasoning, "reply", scripted_reply({
        "Is there any anomaly in the image?": "Yes, the bottle is cracked.",  # correct
        DETECTION_QUESTION: "There is a scratch.",  # wrong: the detection item is normal
        "What is the defect?": "A crack near the neck of the bottle.",  # identical to the reference
    }, calls))
    summary = run_visa_dr(None, None, dataset["data"], tmp_path / "out", image_root=dataset["images"],
                          detection_question=DETECTION_QUESTION, sentence_model=sentence_model)
    assert summary["accuracy"] == 0.5 and summary["counts"]["correct"] == 1 and summary["counts"]["unparsed"] == 0
    lines = {(l["item"], l["turn"]): l for l in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    assert lines[0, 1]["sbert"] == pytest.approx(1.0, abs=1e-4)
    assert lines[2, 0]["sbert"] < 0.5  # "I cannot tell." vs "A glass bottle seen from above."
    scored = [lines[k]["sbert"] for k in [(0, 1), (2, 0), (2, 1), (2, 2)]]
    assert summary["sbert"] == pytest.approx(sum(scored) / 4)
    # Multi-turn: every question sees the earlier turns of its conversation, images only once.
    asked = {q: turns for batch in calls for turns, q, _ in batch}
    assert asked["What is the defect?"] == [("Is there any anomaly in the image?", "Yes, the bottle is cracked.")]
    assert [q for q, _ in asked["How can it be avoided?"]] == ["Describe the object.", "What could cause such damage?"]


def test_resume_generates_only_missing_answers(tiny_model, sentence_model, dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = dict(image_root=dataset["images"], detection_question=DETECTION_QUESTION, sentence_model=sentence_model,
               max_new_tokens=4)
    run_visa_dr(tiny_model.model, tiny_model.processor, dataset["data"], out, **run)
    full = read_jsonl(out / "predictions.jsonl")
    # Interrupted after item 0's first answer and item 1, in the middle of writing the next line.
    kept = [full[0], full[2]]
    (out / "predictions.jsonl").write_text("".join(json.dumps(l) + "\n" for l in kept) + '{"item": 2, "tu')
    calls = []
    monkeypatch.setattr(reasoning, "reply", scripted_reply({}, calls))
    run_visa_dr(tiny_model.model, tiny_model.processor, dataset["data"], out, **run)
    asked = {q: turns for batch in calls for turns, q, _ in batch}
    assert sorted(asked) == sorted(["What is the defect?", "Describe the object.", "What could cause such damage?",
                                    "How can it be avoided?"])
    # The half-done conversation continues from its recorded first answer.
    assert asked["What is the defect?"] == [("Is there any anomaly in the image?", full[0]["response"])]
    lines = read_jsonl(out / "predictions.jsonl")
    assert len(lines) == QUESTIONS_PER_RUN
    assert lines[0]["response"] == full[0]["response"] and lines[2]["response"] == full[2]["response"]
    # A finished run is not redone.
    calls.clear()
    run_visa_dr(tiny_model.model, tiny_model.processor, dataset["data"], out, **run)
    assert calls == []


def test_resume_refuses_predictions_of_other_data(sentence_model, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning, "reply", scripted_reply({}, []))
    out = tmp_path / "out"
    run_visa_dr(None, None, dataset["data"], out, image_root=dataset["images"],
                detection_question=DETECTION_QUESTION, sentence_model=sentence_model)
    records = [dict(VISA_DR_RECORDS[0], questions=["Another question?", "What is the defect?"])]
    dataset["data"].write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(DataError, match="predictions.jsonl.*other data"):
        run_visa_dr(None, None, dataset["data"], out, image_root=dataset["images"],
                    detection_question=DETECTION_QUESTION, sentence_model=sentence_model)


@pytest.mark.parametrize(("record", "message"), [
    ({"category": "bottle", "questions": ["Why?"], "answers": ["Because."]}, "image path must be a non-empty string"),
    ({"image": "bottle/0.png", "questions": ["Why?"]}, "reasoning item has no 'answers'"),
    ({"image": "bottle/0.png", "questions": ["Why?", "Where?"], "answers": ["Because."]}, "2 questions but 1 answers"),
    ({"image": "bottle/0.png"}, "neither a detection item"),
])
def test_missing_fields_name_the_file(dataset, tmp_path, record, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(VISA_DR_RECORDS[1]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{bad}:2.*{message}"):
        run_visa_dr(None, None, bad, tmp_path / "out", image_root=dataset["images"],
                    detection_question=DETECTION_QUESTION, sentence_model=object())


def test_recipe_reports_bad_input_naming_the_file(tiny_checkpoint, dataset, tmp_path):
    (dataset["images"] / "bottle" / "2.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"bad input: .*bottle/2\.png.*not a readable image"):
        load_recipe().main(["--model", str(tiny_checkpoint), "--data", str(dataset["data"]), "--image-root",
                            str(dataset["images"]), "--out", str(tmp_path / "out"), "--max-new-tokens", "2"])


def test_references_need_enough_normals(dataset):
    normals = reasoning.CategoryNormals("mvtec", dataset["normals"], shots=3)
    with pytest.raises(DataError, match="'bottle' has 2 normal training images, fewer than --shots 3"):
        normals.normals("bottle", "x")
    with pytest.raises(DataError, match="no 'category'"):
        normals.normals(None, "visa_dr.jsonl:2")


def test_references_are_fixed_by_seed(dataset):
    draws = [reasoning.CategoryNormals("mvtec", dataset["normals"], shots=1, seed=s).normals("bottle", "x")
             for s in (0, 0, 1, 2, 3)]
    assert draws[0] == draws[1]
    assert len({tuple(d) for d in draws}) == 2  # other seeds draw the other image at some point


# --------------------------------------------------------------------------------------------------
# GPT-score through a local OpenAI-compatible server


class JudgeServer:
    """A chat-completions endpoint on 127.0.0.1 answering a fixed score, recording the requests."""

    def __init__(self, reply: str = "7", status: int = 200):
        self.requests: list[tuple[str, dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_gpt_score_through_local_endpoint(sentence_model, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning, "reply", scripted_reply({"What is the defect?": "A dent."}, []))
    out = tmp_path / "out"
    with JudgeServer("7") as judge:
        scorer = GPTScorer(judge.url, "judge-model", api_key="test-key", timeout=5)
        summary = run_visa_dr(None, None, dataset["data"], out, image_root=dataset["images"],
                              detection_question=DETECTION_QUESTION, sentence_model=sentence_model, gpt_scorer=scorer)
        assert summary["gpt_score"] == 7.0 and summary["counts"]["gpt_scored"] == 4
        assert len(judge.requests) == 4  # reasoning questions only, not the yes/no ones
        path, headers, body = judge.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer test-key"
        assert body["model"] == "judge-model" and body["temperature"] == 0
        prompt = body["messages"][-1]["content"]
        assert "What is the defect?" in prompt and "A crack near the neck of the bottle." in prompt
        assert "A dent." in prompt and "from 0 to 10" in prompt
        lines = read_jsonl(out / "predictions.jsonl")
        assert [l.get("gpt_score") for l in lines if not l["detection"]] == [7.0] * 4
        # Cached: a re-run asks the judge nothing.
        run_visa_dr(None, None, dataset["data"], out, image_root=dataset["images"],
                    detection_question=DETECTION_QUESTION, sentence_model=sentence_model, gpt_scorer=scorer)
        assert len(judge.requests) == 4


def test_gpt_score_errors_name_the_endpoint():
    with JudgeServer(status=500) as judge:
        with pytest.raises(RuntimeError, match=f"{judge.url}/chat/completions failed after 1 attempts"):
            GPTScorer(judge.url, "judge", retries=0, timeout=5).score("q", "r", "a")


def test_limit_keeps_the_other_recorded_predictions(sentence_model, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning, "reply", scripted_reply({}, []))
    run = dict(image_root=dataset["images"], detection_question=DETECTION_QUESTION, sentence_model=sentence_model)
    run_visa_dr(None, None, dataset["data"], tmp_path / "out", **run)
    summary = run_visa_dr(None, None, dataset["data"], tmp_path / "out", limit=1, **run)
    assert summary["counts"]["items"] == 1
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == QUESTIONS_PER_RUN
