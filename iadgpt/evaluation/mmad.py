"""MMAD multiple choice, asked and scored by the rules of the benchmark's official code.

MMAD (Jiang et al., ICLR 2025; repository jam-cc/MMAD) compares inspectors with a table per source
dataset x subtask. Published numbers come from its scripts, so this module follows them point by
point; docs/mmad.md lists every rule with the official file and function it comes from.

Asking (`evaluation/examples/Transformers/qwen2_5_vl_query.py`, `QwenQuery.get_query` and the
`GPT4Query.parse_conversation` / `parse_answer` it inherits):
  * references: `random_templates[:k]` of the item, `similar_templates[:k]` on request;
  * each question asked on its own, in one user message: the instruction, "Answer with the
    option's letter from the given choices directly! ", for k > 0 the template sentence and the k
    templates, "Following is the query image: ", the query, "Following is the question list: ",
    the question and its options lettered A, B, ... in file order (`mmad_messages`);
  * the chat template with `add_vision_id` ("Picture N: " before each image), images read and
    resized as qwen_vl_utils does (`official_image`) and then by the processor to between 64x28x28
    and 1280x28x28 pixels, greedy decoding, 128 new tokens at most;
  * the letter: the last standalone A-E of the answer, else the option whose text is closest to
    the answer (difflib); when neither gives one, the raw answer is recorded (`parse_answer_letter`).
Scoring (`evaluation/examples/helper/summary.py`, `caculate_accuracy_mmad`; `score_answers`):
  * dataset = the image path's first component; "Object Structure" and "Object Details" count as
    "Object Analysis";
  * answers whose correct or given letter is not one of A-E are left out (and counted);
  * a cell is the accuracy of a dataset's questions of a subtask, in %; "Anomaly Detection" is the
    mean of the accuracy on normal images (path contains "good") and on anomalous ones;
  * a dataset's Average is the mean over its subtask cells, the Average row the mean over datasets
    of every column, and the overall figure the Average row's Average;
  * beside them, as in the published tables: Recall, Precision and F1 of the anomaly-detection
    question (anomalous = positive), Overkill (normal images called anomalous) and Miss, in %.
The official script has two quirks that move its numbers; `official=True` (the default) keeps them
so that our numbers compare with published ones, `official=False` corrects them:
  * it removes left-out answers from the list it is iterating over, so the answer right after each
    left-out one is never looked at (`MMADScore.skipped` counts them);
  * a cell without questions is 0, not empty, and enters the averages (a dataset without normal
    images gets 0 for that half of "Anomaly Detection"; its Overkill is 100).

Running (`run_mmad`) is resumable: every answer is appended to OUT/mmad_predictions.jsonl as soon as
its batch finishes, and a re-run with the same OUT asks only what is missing. The answers are then
written as OUT/mmad_answers.json in the official answers-file format (which the official summary
script reads, and which `eval/mmad_score.py` scores), and the table as OUT/mmad_accuracy.csv/.md.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data.readers import MMADItem, MMADReader, MultipleChoiceQuestion
from ..data.samples import DataError, load_image
from ..data.tasks import ResizeRule

MMAD_PREDICTIONS_FILE = "mmad_predictions.jsonl"
ANSWERS_FILE = "mmad_answers.json"
TABLE_CSV_FILE = "mmad_accuracy.csv"
TABLE_MARKDOWN_FILE = "mmad_accuracy.md"

# --------------------------------------------------------------------------------------------------
# The official prompt (qwen2_5_vl_query.py, with `instruction` imported from gpt4v.py)

INSTRUCTION = (
    "\nYou are an industrial inspector who checks products by images. You should judge whether there is a defect "
    "in the query image and answer the questions about it.\nAnswer with the option's letter from the given choices "
    "directly.\n"
)
"""gpt4v.py's `instruction`, a triple-quoted literal: hence the leading and trailing newlines."""
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly! "
TEMPLATE_INTRO = ("Following is/are {count} image of normal sample, which can be used as a template to compare the "
                  "image being queried.")
QUERY_INTRO = "Following is the query image: "
QUESTION_LIST_INTRO = "Following is the question list: "

MMAD_MIN_PIXELS = 64 * 28 * 28
MMAD_MAX_PIXELS = 1280 * 28 * 28
MMAD_MAX_NEW_TOKENS = 128
"""The official Qwen2.5-VL script's processor limits and generation length."""
QWEN_VL_UTILS_MIN_TOKENS = 4
QWEN_VL_UTILS_MAX_TOKENS = 16384
"""qwen_vl_utils' own limits, in tokens of factor x factor pixels, for the resize it does before the processor's."""

LETTERS = ("A", "B", "C", "D", "E")
"""The letters the official parser reads and the summary accepts; anything else is left out."""


@dataclass(frozen=True)
class AskedQuestion:
    """A question as the official script asks it: options relettered A, B, ... in file order."""

    text: str
    """The question's text part of the prompt: the question, " \\n", one "X. option\\n" per option."""
    options: dict[str, str]
    answer: str
    question_type: str


def asked_question(question: MultipleChoiceQuestion) -> AskedQuestion:
    """`GPT4Query.parse_conversation(add_question_id=False)`: options lettered by position (the
    file's letters are replaced, the answer follows its option), the question without a number."""
    options = {chr(ord("A") + i): text for i, (_, text) in enumerate(question.options)}
    answer = chr(ord("A") + [letter for letter, _ in question.options].index(question.answer))
    options_text = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return AskedQuestion(f"{question.question} \n{options_text}", options, answer, question.question_type)


def mmad_messages(question_text: str, shots: int) -> list[dict]:
    """The one user message of `QwenQuery.get_query`: image entries are placeholders, filled in
    order by the templates (`shots` of them) and then the query image."""
    content = [{"type": "text", "text": INSTRUCTION}, {"type": "text", "text": LETTER_INSTRUCTION}]
    if shots:
        content.append({"type": "text", "text": TEMPLATE_INTRO.format(count=shots)})
        content.extend({"type": "image"} for _ in range(shots))
    content += [{"type": "text", "text": QUERY_INTRO}, {"type": "image"},
                {"type": "text", "text": QUESTION_LIST_INTRO}, {"type": "text", "text": question_text}]
    return [{"role": "user", "content": content}]


def qwen_vl_utils_rule(factor: int = 28) -> ResizeRule:
    """The resize qwen_vl_utils' `fetch_image` does before the processor's: the multiples of `factor`
    nearest the image's size, within 4 to 16384 tokens of factor x factor pixels."""
    return ResizeRule(factor, QWEN_VL_UTILS_MIN_TOKENS * factor ** 2, QWEN_VL_UTILS_MAX_TOKENS * factor ** 2)


def official_image(path: str | os.PathLike, factor: int = 28) -> Image.Image:
    """The image as the official script hands it to the processor.

    The script reads images with qwen_vl_utils' `process_vision_info`, whose `fetch_image` composites
    an RGBA image on white and resizes it (PIL's default filter, bicubic) to the multiples of
    `factor` nearest its size, within 4 to 16384 tokens; only then does the processor resize that to
    the MMAD limits. Resizing the original once instead lands on another grid for some sizes (a
    1275x850 image: 43x29 tokens against the official 44x28), and every image's pixels differ.
    """
    image = load_image(path, background=(255, 255, 255))
    size = qwen_vl_utils_rule(factor).size(*image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def mmad_references(item: MMADItem, shots: int, similar: bool = False) -> list[Path]:
    """`random_templates[:shots]`, or `similar_templates[:shots]` with `similar` (the official
    `--similar_template`). Like the official slice, an item with fewer templates gets fewer."""
    if shots < 0:
        raise ValueError(f"shots={shots}: the number of templates cannot be negative")
    return list((item.similar_templates if similar else item.random_templates)[:shots])


_STANDALONE_LETTER = re.compile(r"\b([A-E])\b")


def parse_answer_letter(response: str, options: dict[str, str]) -> str | None:
    """`GPT4Query.parse_answer` as the query scripts use it: the last standalone capital A-E in the
    answer; if there is none, the letter of the option text closest to the whole answer
    (`difflib.get_close_matches(response, texts, n=1, cutoff=0.0)`); None if that finds nothing
    either (no options), in which case the official script records the raw answer."""
    letters = _STANDALONE_LETTER.findall(response)
    if letters:
        return letters[-1]
    closest = difflib.get_close_matches(response, list(options.values()), n=1, cutoff=0.0)
    if closest:
        return next(letter for letter, text in options.items() if text == closest[0])
    return None


# --------------------------------------------------------------------------------------------------
# The answers file

ANSWER_FIELDS = ("image", "question", "question_type", "correct_answer", "gpt_answer")


def answer_entry(image: str, question: AskedQuestion, response: str) -> dict:
    """One entry of the official answers file; `gpt_answer` is the letter read from `response`,
    or the raw response when no letter can be read (the official script does the same)."""
    letter = parse_answer_letter(response, question.options)
    return {"image": image, "question": {"type": "text", "text": question.text, "options": question.options},
            "question_type": question.question_type, "correct_answer": question.answer,
            "gpt_answer": letter if letter is not None else response}


def load_answers(path: str | os.PathLike) -> list[dict]:
    """An answers file (a JSON list of {"image", "question", "question_type", "correct_answer",
    "gpt_answer"}) as written by the official query scripts or by `run_mmad`. Raises DataError naming
    the file and the entry for anything the scorer cannot read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: answers file does not exist")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: malformed JSON: {error.msg}") from error
    if not isinstance(answers, list):
        raise DataError(f"{path}: expected a JSON list of answers, found {type(answers).__name__}")
    if not answers:
        raise DataError(f"{path}: no answers")
    for index, answer in enumerate(answers):
        where = f"{path}: answer {index}"
        if not isinstance(answer, dict):
            raise DataError(f"{where}: expected an object, found {type(answer).__name__}")
        missing = [name for name in ("image", "question_type", "correct_answer", "gpt_answer") if name not in answer]
        if missing:
            raise DataError(f"{where}: missing {', '.join(map(repr, missing))}")
        for name in ("image", "question_type"):
            if not isinstance(answer[name], str) or not answer[name]:
                raise DataError(f"{where}: {name!r} must be a non-empty string, found {answer[name]!r}")
    return answers


def write_answers(path: Path, answers: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(answers, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Scoring (summary.py, caculate_accuracy_mmad)

MERGED_SUBTASKS = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
DETECTION_SUBTASK = "Anomaly Detection"
NORMAL_FLAG = "good"
AVERAGE = "Average"
DETECTION_COLUMNS = ("Recall", "Precision", "F1", "Overkill", "Miss")
"""Published beside the Average (Recall/Precision/F1 in every all_result/ table of the official
repository, Overkill/Miss in some): not part of any average but the Average row's."""


def dataset_of(answer: dict) -> str:
    return answer["image"].split("/")[0]


def subtask_of(answer: dict) -> str:
    return MERGED_SUBTASKS.get(answer["question_type"], answer["question_type"])


def is_scorable(answer: dict) -> bool:
    return answer["correct_answer"] in LETTERS and answer["gpt_answer"] in LETTERS


@dataclass
class _Tally:
    """Correct and total answers of one dataset: per subtask, and for the detection question split
    into normal and anomalous images."""

    subtasks: dict[str, list[int]] = field(default_factory=dict)
    normal: list[int] = field(default_factory=lambda: [0, 0])
    anomalous: list[int] = field(default_factory=lambda: [0, 0])


@dataclass
class MMADScore:
    """The per-dataset x subtask table and the counts behind it."""

    datasets: list[str]
    subtasks: list[str]
    rows: dict[str, dict[str, float | None]]
    """dataset (and "Average") -> column -> % (None: no question, with `official=False` only)."""
    answers: int
    scored: int
    left_out: int
    """Answers left out for a letter outside A-E (those the scoring loop looked at)."""
    skipped: int
    """Answers the official loop never looks at (the one after each left-out answer); 0 when corrected."""
    outside_letters: int
    """Answers with a letter outside A-E in the whole file: the corrected left-out count."""
    official: bool

    @property
    def columns(self) -> list[str]:
        extra = list(DETECTION_COLUMNS) if DETECTION_SUBTASK in self.subtasks else []
        return [*self.subtasks, AVERAGE, *extra]

    @property
    def overall(self) -> float | None:
        return self.rows[AVERAGE][AVERAGE]

    def as_dict(self) -> dict:
        return {"overall": self.overall, "columns": self.columns, "table": self.rows,
                "counts": {"answers": self.answers, "scored": self.scored, "left_out": self.left_out,
                           "skipped_after_left_out": self.skipped, "outside_A_E": self.outside_letters},
                "official_quirks": self.official}


def _percent(correct: int, total: int, official: bool) -> float | None:
    if total:
        return 100.0 * correct / total
    return 0.0 if official else None


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def f1_percent(precision: float | None, recall: float | None, official: bool = True) -> float | None:
    """F1 from precision and recall in % (0 when both are 0, as the official script's pattern)."""
    if precision is None or recall is None:
        return None
    if precision + recall == 0:
        return 0.0 if official else None
    return 2 * precision * recall / (precision + recall)


def _dataset_row(tally: _Tally, subtasks: list[str], official: bool) -> dict[str, float | None]:
    row = {name: _percent(*tally.subtasks.get(name, (0, 0)), official) for name in subtasks}
    if DETECTION_SUBTASK not in subtasks:
        return row
    normal_accuracy = _percent(*tally.normal, official)
    anomalous_accuracy = _percent(*tally.anomalous, official)
    # summary.py: (normal_acc + anomaly_acc) / 2, a half being 0 when its kind of image is absent;
    # corrected, an absent half is left out of the mean.
    row[DETECTION_SUBTASK] = _mean([normal_accuracy, anomalous_accuracy])
    true_positives = tally.anomalous[0]
    false_positives = tally.normal[1] - tally.normal[0]
    row["Recall"] = anomalous_accuracy
    row["Precision"] = _percent(true_positives, true_positives + false_positives, official)
    row["F1"] = f1_percent(row["Precision"], row["Recall"], official)
    row["Overkill"] = None if normal_accuracy is None else 100.0 - normal_accuracy
    row["Miss"] = None if anomalous_accuracy is None else 100.0 - anomalous_accuracy
    return row


def with_averages(rows: dict[str, dict[str, float | None]], subtasks: list[str],
                  columns: list[str]) -> dict[str, dict[str, float | None]]:
    """Each dataset's Average (mean of its subtask cells) and the Average row (mean over datasets of
    every column, the Average column included), as summary.py's two `DataFrame.mean` calls do
    (pandas skips missing cells, which only the corrected table has)."""
    rows = {name: dict(row) for name, row in rows.items()}
    for row in rows.values():
        row[AVERAGE] = _mean(row.get(name) for name in subtasks)
    table = {name: {column: row.get(column) for column in columns} for name, row in rows.items()}
    table[AVERAGE] = {column: _mean(row[column] for row in table.values()) for column in columns}
    return table


def score_answers(answers: list[dict], official: bool = True) -> MMADScore:
    """The official table of an answers list (see the module docstring for the rules).

    `official=True` reproduces summary.py, quirks included; `official=False` looks at every answer
    and leaves cells without questions empty (out of the averages) instead of 0.
    """
    datasets: list[str] = []
    subtasks: list[str] = []
    # Rows and columns come from every answer, scorable or not, in order of first appearance, as
    # summary.py builds them before it leaves any answer out.
    for answer in answers:
        if dataset_of(answer) not in datasets:
            datasets.append(dataset_of(answer))
        if subtask_of(answer) not in subtasks:
            subtasks.append(subtask_of(answer))
    tallies = {name: _Tally() for name in datasets}
    scored = left_out = skipped = 0
    index = 0
    while index < len(answers):
        answer = answers[index]
        index += 1
        if not is_scorable(answer):
            left_out += 1
            if official and index < len(answers):
                # summary.py calls all_answers_json.remove(answer) inside `for answer in
                # all_answers_json`: the list shifts left under the iterator, which then never
                # sees the answer that followed the removed one.
                skipped += 1
                index += 1
            continue
        scored += 1
        tally = tallies[dataset_of(answer)]
        correct = int(answer["correct_answer"] == answer["gpt_answer"])
        cell = tally.subtasks.setdefault(subtask_of(answer), [0, 0])
        cell[0] += correct
        cell[1] += 1
        if subtask_of(answer) == DETECTION_SUBTASK:
            half = tally.normal if NORMAL_FLAG in answer["image"] else tally.anomalous
            half[0] += correct
            half[1] += 1
    score = MMADScore(datasets, subtasks, {}, len(answers), scored, left_out, skipped,
                      sum(not is_scorable(a) for a in answers), official)
    rows = {name: _dataset_row(tallies[name], subtasks, official) for name in datasets}
    score.rows = with_averages(rows, subtasks, score.columns)
    return score


# --------------------------------------------------------------------------------------------------
# Reports


def _csv_cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def table_csv(score: MMADScore) -> str:
    """The table as summary.py writes it (`DataFrame.to_csv`: full precision, empty corner cell)."""
    lines = ["," + ",".join(score.columns)]
    for name, row in score.rows.items():
        lines.append(",".join([name] + [_csv_cell(row[column]) for column in score.columns]))
    return "\n".join(lines) + "\n"


def counts_line(score: MMADScore) -> str:
    """The left-out count, and how the official loop's skipping changes what is scored."""
    line = f"{score.scored} of {score.answers} answers scored; left out (letter outside A-E): {score.left_out}"
    if score.official and score.skipped:
        line += (f"; the official loop also skips the {score.skipped} answer(s) right after a left-out one "
                 f"(corrected: {score.outside_letters} left out, {score.answers - score.outside_letters} scored)")
    return line


def table_markdown(score: MMADScore, title: str | None = None) -> str:
    """The table in Markdown (2 decimals, "–" for an empty cell), with the counts below."""
    def cell(value: float | None) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{value:.2f}"

    lines = [f"# {title}", ""] if title else []
    lines += ["| Dataset | " + " | ".join(score.columns) + " |", "|---|" + "---:|" * len(score.columns)]
    for name, row in score.rows.items():
        label = f"**{name}**" if name == AVERAGE else name
        lines.append(f"| {label} | " + " | ".join(cell(row[column]) for column in score.columns) + " |")
    rules = ("official summary.py rules, its quirks included" if score.official
             else "official rules with summary.py's quirks corrected")
    lines += ["", f"Accuracy in %, {rules}. {counts_line(score)}."]
    return "\n".join(lines) + "\n"


def report(answers: list[dict], title: str | None = None, corrected_table: bool = False) -> tuple[str, dict]:
    """The official table in Markdown plus, below, the overall figure with the quirks corrected
    (the whole corrected table with `corrected_table`); and both as a JSON-ready dict."""
    official = score_answers(answers, official=True)
    corrected = score_answers(answers, official=False)
    text = table_markdown(official, title)
    if corrected_table:
        text += "\n" + table_markdown(corrected, "Quirks corrected")
    elif corrected.rows != official.rows:
        text += (f"With summary.py's quirks corrected the overall average is {_format(corrected.overall)} "
                 f"(official rules: {_format(official.overall)}); eval/mmad_score.py --corrected shows that table.\n")
    return text, {**official.as_dict(), "corrected": corrected.as_dict()}


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def write_tables(out: Path, score: MMADScore, title: str | None = None) -> tuple[Path, Path]:
    csv_path, markdown_path = out / TABLE_CSV_FILE, out / TABLE_MARKDOWN_FILE
    csv_path.write_text(table_csv(score), encoding="utf-8")
    markdown_path.write_text(table_markdown(score, title), encoding="utf-8")
    return csv_path, markdown_path


# --------------------------------------------------------------------------------------------------
# Running a model


def run_mmad(model, processor, data: str | os.PathLike, out: str | os.PathLike, *,
             image_root: str | os.PathLike | None = None, shots: int = 1, similar_templates: bool = False,
             batch_size: int = 4, max_new_tokens: int = MMAD_MAX_NEW_TOKENS, min_pixels: int = MMAD_MIN_PIXELS,
             max_pixels: int = MMAD_MAX_PIXELS, limit: int | None = None) -> dict:
    """Ask every MMAD question (resumably), write the answers file and the table; returns a summary.

    The processor's pixel limits are set to `min_pixels` / `max_pixels` for the run and restored
    afterwards. Bad input (an unreadable mmad.json record, a missing or broken image) raises
    DataError naming the file.
    """
    from ..dialogue import generate_text
    from ..model.checkpoint import pixel_limits, set_pixel_limits
    from ..model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_QUERY
    from ..model.prompts import generation_inputs
    from .reasoning import PredictionLog, check_recorded, log_progress, relative_key

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reader = MMADReader(data, image_root=image_root)
    items = list(reader.items())
    if not items:
        raise DataError(f"{reader.path}: no MMAD items")
    items = items[:limit] if limit is not None else items
    # add_vision_id is a variable of Qwen2.5-VL's chat template; a template without it ignores it.
    vision_ids = "add_vision_id" in (getattr(processor, "chat_template", None) or "")
    log = PredictionLog(out / MMAD_PREDICTIONS_FILE, ("item", "question_index"))
    planned, pending, short = [], [], 0
    for i, item in enumerate(items):
        references = mmad_references(item, shots, similar_templates)
        short += len(references) < shots
        image = relative_key(item.image, reader.image_root)
        reference_keys = [relative_key(path, reader.image_root) for path in references]
        for q, question in enumerate(item.questions):
            asked = asked_question(question)
            entry = (i, q, item, image, references, reference_keys, asked)
            planned.append(entry)
            expected = {"image": image, "question": asked.text, "references": reference_keys}
            if check_recorded(log.get(i, q), expected, log) is None:
                pending.append(entry)
    if short:
        log_progress(f"mmad: {short} item(s) have fewer than {shots} "
             f"{'similar' if similar_templates else 'random'} templates and are asked with what they have")
    if len(planned) - len(pending):
        log_progress(f"mmad: {len(planned) - len(pending)} of {len(planned)} questions already answered in "
                     f"{log.path}")
    factor = ResizeRule.of_processor(processor).factor
    previous_limits = pixel_limits(processor)
    set_pixel_limits(processor, min_pixels, max_pixels)
    item_images: dict[int, list] = {}  # the current item's images: its questions come one after another
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            conversations = []
            for i, _, item, _, references, _, asked in batch:
                if i not in item_images:  # decoded and resized once for all of the item's questions
                    item_images = {i: [official_image(path, factor) for path in [*references, item.image]]}
                images = item_images[i]
                conversations.append((mmad_messages(asked.text, len(references)), images,
                                      [ROLE_EXEMPLAR] * len(references) + [ROLE_QUERY]))
            inputs = generation_inputs(processor, conversations, {"add_vision_id": True} if vision_ids else None)
            responses = generate_text(model, processor, inputs, max_new_tokens)
            log.append([{"item": i, "question_index": q, "image": image, "references": reference_keys,
                         "question": asked.text, "options": asked.options, "answer": asked.answer,
                         "type": asked.question_type, "response": response}
                        for (i, q, _, image, _, reference_keys, asked), response in zip(batch, responses)])
            log_progress(f"mmad: {len(planned) - len(pending) + start + len(batch)}/{len(planned)} questions")
    finally:
        set_pixel_limits(processor, *previous_limits)
    records = [log.get(i, q) for i, q, *_ in planned]
    # The letter is read again from the recorded text, so a change of parser applies to old answers too.
    answers = [answer_entry(image, asked, record["response"])
               for (_, _, _, image, _, _, asked), record in zip(planned, records)]
    answers_path = write_answers(out / ANSWERS_FILE, answers)
    references_name = "similar_templates" if similar_templates else "random_templates"
    title = f"MMAD, {shots}-shot ({references_name})"
    text, summary = report(answers, title)
    write_tables(out, score_answers(answers), title)
    log_progress(text)
    return {**summary, "shots": shots, "references": references_name, "short_reference_items": short,
            "min_pixels": min_pixels, "max_pixels": max_pixels, "max_new_tokens": max_new_tokens,
            "vision_ids": vision_ids, "items": len(items), "answers_file": str(answers_path)}
