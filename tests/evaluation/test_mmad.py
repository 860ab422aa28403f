"""MMAD by the official rules: the table of a hand-built answers file computed by hand, the skipping
quirk against a literal transcription of summary.py's loop, the arithmetic of a published table, the
prompt's exact text for k = 0, 1, 2, the letter parsing, and `eval/reasoning.py --mmad` end to end on
a small MMAD-format tree with the tiny random-weight model."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadgpt.data.readers import MMADReader
from iadgpt.data.samples import DataError
from iadgpt.evaluation import mmad

REPO = Path(__file__).resolve().parents[2]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}_recipe", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------------------------------
# The fixture: an MMAD-format tree and an answers file for its questions

AD = {"A": "Yes.", "B": "No."}
MMAD_DOCUMENT = {
    "DS-MVTec/bottle/image/broken/000.png": {
        "mask_path": "", "similar_templates": ["DS-MVTec/bottle/train/good/s0.png", "DS-MVTec/bottle/train/good/s1.png"],
        "random_templates": ["DS-MVTec/bottle/train/good/r0.png", "DS-MVTec/bottle/train/good/r1.png"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "A", "type": "Anomaly Detection"},
            {"Question": "What type of defect?", "Options": {"A": "Crack.", "B": "Break.", "C": "Stain."},
             "Answer": "B", "type": "Defect Classification"},
            {"Question": "What shape is the bottle mouth?", "Options": {"A": "Round.", "B": "Square."}, "Answer": "A",
             "type": "Object Structure"}]},
    "DS-MVTec/bottle/image/good/001.png": {
        "mask_path": "", "similar_templates": ["DS-MVTec/bottle/train/good/s0.png"],
        "random_templates": ["DS-MVTec/bottle/train/good/r1.png", "DS-MVTec/bottle/train/good/r0.png"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "B", "type": "Anomaly Detection"},
            {"Question": "What colour is the label?", "Options": {"A": "Red.", "B": "Blue.", "C": "Green."},
             "Answer": "C", "type": "Object Details"},
            {"Question": "How many bottles are there?", "Options": {"A": "One.", "B": "Two."}, "Answer": "A",
             "type": "Object Structure"}]},
    "DS-MVTec/bottle/image/good/002.png": {
        "mask_path": "", "similar_templates": ["DS-MVTec/bottle/train/good/s1.png"],
        "random_templates": ["DS-MVTec/bottle/train/good/r0.png"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "B", "type": "Anomaly Detection"}]},
    "GoodsAD/drink/scratch/003.jpg": {
        "mask_path": "", "similar_templates": ["GoodsAD/drink/good/t0.jpg"], "random_templates": ["GoodsAD/drink/good/t0.jpg"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "A", "type": "Anomaly Detection"},
            {"Question": "What type of defect?", "Options": ["Dent.", "Stain.", "Tear.", "Scratch."], "Answer": "D",
             "type": "Defect Classification"},
            {"Question": "What is printed on the can?", "Options": {"A": "A logo.", "B": "Text."}, "Answer": "B",
             "type": "Object Details"}]},
    "GoodsAD/drink/scratch/004.jpg": {
        "mask_path": "", "similar_templates": ["GoodsAD/drink/good/t0.jpg"], "random_templates": ["GoodsAD/drink/good/t0.jpg"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "A", "type": "Anomaly Detection"},
            {"Question": "What type of defect?", "Options": {"A": "Scratch.", "B": "Dent."}, "Answer": "A",
             "type": "Defect Classification"}]},
    "VisA/candle/test/good/005.JPG": {
        "mask_path": "", "similar_templates": ["VisA/candle/train/good/t0.JPG"],
        "random_templates": ["VisA/candle/train/good/t1.JPG"],
        "conversation": [
            {"Question": "Is there any defect in the object?", "Options": AD, "Answer": "B", "type": "Anomaly Detection"}]},
}
GIVEN = ["A", "C", "A",                      # DS-MVTec 000 (anomalous): right, wrong, right
         "B", "The label is intact.", "B",   # DS-MVTec 001 (normal): right, outside A-E, wrong (skipped officially)
         "A",                                # DS-MVTec 002 (normal): wrong
         "A", "D", "B",                      # GoodsAD 003 (anomalous; GoodsAD has no normal image): all right
         "B", "A",                           # GoodsAD 004: wrong, right
         "B"]                                # VisA 005 (normal; VisA has only this question): right


@pytest.fixture()
def mmad_tree(tmp_path):
    """mmad.json and its images (queries and templates), MMAD's layout relative to the data root."""
    root = tmp_path / "MMAD"
    paths = set(MMAD_DOCUMENT)
    for record in MMAD_DOCUMENT.values():
        paths.update(record["similar_templates"] + record["random_templates"])
    for seed, path in enumerate(sorted(paths)):
        save_image(root / path, seed)
    (root / "mmad.json").write_text(json.dumps(MMAD_DOCUMENT, indent=2))
    return root


def fixture_answers() -> list[dict]:
    """The answers file for the fixture's questions, in the official format."""
    entries = []
    given = iter(GIVEN)
    for image, record in MMAD_DOCUMENT.items():
        for qa in record["conversation"]:
            options = qa["Options"] if isinstance(qa["Options"], dict) else {
                chr(65 + i): text for i, text in enumerate(qa["Options"])}
            entries.append({"image": image, "question": {"type": "text", "text": qa["Question"], "options": options},
                            "question_type": qa["type"], "correct_answer": qa["Answer"], "gpt_answer": next(given)})
    assert next(given, None) is None
    return entries


# --------------------------------------------------------------------------------------------------
# The table, by hand

COLUMNS = ["Anomaly Detection", "Defect Classification", "Object Analysis", "Average",
           "Recall", "Precision", "F1", "Overkill", "Miss"]

# Official rules (summary.py). Answer 5 ("The label is intact.") is left out, and the loop never
# looks at answer 6 (it follows a left-out one).
#  DS-MVTec: AD normal 1/2 (001 right, 002 wrong), anomalous 1/1 -> (50 + 100) / 2 = 75; DC 0/1 = 0;
#            OA: answer 3 right (5 left out, 6 skipped) -> 100; Average (75 + 0 + 100) / 3 = 58.33;
#            TP 1, FP 1 (002), FN 0: Recall 100, Precision 50, F1 2*50*100/150 = 66.67;
#            Overkill 100 - 50 = 50, Miss 0.
#  GoodsAD:  AD normal none -> 0, anomalous 1/2 -> (0 + 50) / 2 = 25; DC 2/2 = 100; OA 1/1 = 100;
#            Average 225 / 3 = 75; TP 1, FP 0, FN 1: Recall 50, Precision 100, F1 66.67;
#            Overkill 100 - 0 = 100 (no normal image counts as 0 % right), Miss 50.
#  VisA:     AD normal 1/1, anomalous none -> (100 + 0) / 2 = 50; DC and OA have no question -> 0;
#            Average 50 / 3 = 16.67; TP 0, FP 0, FN 0: Recall 0, Precision 0, F1 0; Overkill 0, Miss 100.
#  Average row: the mean over the three datasets of every column.
F1_BOTH = 2 * 50 * 100 / 150
OFFICIAL = {
    "DS-MVTec": [75, 0, 100, 175 / 3, 100, 50, F1_BOTH, 50, 0],
    "GoodsAD": [25, 100, 100, 75, 50, 100, F1_BOTH, 100, 50],
    "VisA": [50, 0, 0, 50 / 3, 0, 0, 0, 0, 100],
}
OFFICIAL["Average"] = [50, 100 / 3, 200 / 3, 50, 50, 50, 2 * F1_BOTH / 3, 50, 50]

# Quirks corrected: answer 6 counts (wrong); an empty cell stays empty and out of every mean; a
# detection half without images is left out of the "Anomaly Detection" mean.
#  DS-MVTec: OA 1/2 = 50 -> Average (75 + 0 + 50) / 3 = 41.67; the rest as above.
#  GoodsAD:  AD = the anomalous half only, 50; Average (50 + 100 + 100) / 3 = 83.33; Overkill empty.
#  VisA:     AD = the normal half only, 100; DC, OA empty; Average 100; Recall, Precision, F1, Miss empty.
CORRECTED = {
    "DS-MVTec": [75, 0, 50, 125 / 3, 100, 50, F1_BOTH, 50, 0],
    "GoodsAD": [50, 100, 100, 250 / 3, 50, 100, F1_BOTH, None, 50],
    "VisA": [100, None, None, 100, None, None, None, 0, None],
}
CORRECTED["Average"] = [75, 50, 75, 75, 75, 75, F1_BOTH, 25, 25]


def assert_table(score: mmad.MMADScore, expected: dict[str, list]) -> None:
    assert score.columns == COLUMNS
    assert list(score.rows) == list(expected)
    for name, values in expected.items():
        for column, value in zip(COLUMNS, values):
            got = score.rows[name][column]
            assert (got is None) if value is None else got == pytest.approx(value, abs=1e-9), (name, column, got)


def test_official_table_of_the_fixture_answers():
    score = mmad.score_answers(fixture_answers())
    assert_table(score, OFFICIAL)
    assert score.overall == pytest.approx(50.0)
    assert (score.answers, score.scored, score.left_out, score.skipped, score.outside_letters) == (13, 11, 1, 1, 1)


def test_corrected_table_of_the_fixture_answers():
    score = mmad.score_answers(fixture_answers(), official=False)
    assert_table(score, CORRECTED)
    assert score.overall == pytest.approx(75.0)
    assert (score.scored, score.left_out, score.skipped) == (12, 1, 0)


def official_loop_counts(answers: list[dict]) -> tuple[int, int]:
    """summary.py's scoring loop transcribed literally (removing from the list it iterates over):
    (answers counted, answers removed)."""
    answers = [dict(a) for a in answers]
    counted = removed = 0
    for answer in answers:
        if answer["correct_answer"] not in mmad.LETTERS or answer["gpt_answer"] not in mmad.LETTERS:
            answers.remove(answer)
            removed += 1
            continue
        counted += 1
    return counted, removed


@pytest.mark.parametrize("seed", range(6))
def test_skipping_matches_summary_py_loop_on_runs_of_bad_answers(seed):
    rng = random.Random(seed)
    answers = [{"image": f"DS/x/{i}.png", "question_type": "Defect Classification", "correct_answer": "A",
                "gpt_answer": rng.choice(["A", "B", "no letter", ""])} for i in range(40)]
    score = mmad.score_answers(answers)
    assert (score.scored, score.left_out) == official_loop_counts(answers)
    assert score.skipped == 40 - score.scored - score.left_out
    assert score.outside_letters == sum(a["gpt_answer"] not in mmad.LETTERS for a in answers)
    assert mmad.score_answers(answers, official=False).scored == 40 - score.outside_letters


def test_two_bad_answers_in_a_row_the_second_is_skipped_not_left_out():
    base = {"image": "DS/x/0.png", "question_type": "Anomaly Detection", "correct_answer": "A"}
    answers = [dict(base, gpt_answer="?"), dict(base, gpt_answer="??"), dict(base, gpt_answer="A")]
    score = mmad.score_answers(answers)
    assert (score.scored, score.left_out, score.skipped, score.outside_letters) == (1, 1, 1, 2)


# Published: all_result/answers_1_shot_Qwen2.5-VL-7B-Instruct_accuracy.csv in jam-cc/MMAD (commit f9a0e6fd).
PUBLISHED_QWEN2_5_VL_7B = """\
,Anomaly Detection,Defect Classification,Defect Localization,Defect Description,Defect Analysis,Object Classification,Object Analysis,Average,Recall,Precision,F1
DS-MVTec,86.40039292041608,73.11203319502074,74.60184409052808,74.60840890354493,90.70539419087137,99.56896551724138,92.97732260424286,84.56776591740936,81.40293637846656,96.14643545279384,88.1625441696113
MVTec-LOCO,61.51850053481957,44.5010183299389,51.83299389002036,59.856262833675565,72.95597484276729,89.70588235294117,78.9279112754159,65.61407772279698,55.846774193548384,74.66307277628033,63.89850057670127
VisA,75.5906804731109,51.26050420168067,61.06934001670844,63.613445378151255,73.34479793637145,86.41711229946523,82.85816108339273,70.59343448412582,58.180300500834726,91.34993446920052,71.08618052014279
GoodsAD,60.9041768068341,55.22501906941266,55.24568393094289,58.43960990247562,76.02739726027397,90.2559867877787,79.92277992277992,68.00295052578541,68.30165542611894,65.3755868544601,66.80659670164918
Average,71.10343768379516,56.02464369901325,60.687465482049944,64.12943175446185,78.25839105757102,91.48698673935662,83.67154372145785,72.19455716252939,65.93291662474215,81.8837573881837,72.48845549202613
"""


def test_averaging_reproduces_a_published_table():
    """From the published subtask, Recall and Precision cells, our averaging and F1 give the
    published Average column, Average row (overall 72.19) and F1 column."""
    header, *lines = PUBLISHED_QWEN2_5_VL_7B.splitlines()
    columns = header.split(",")[1:]
    published = {line.split(",")[0]: dict(zip(columns, map(float, line.split(",")[1:]))) for line in lines}
    subtasks = columns[:7]
    cells = {name: {c: row[c] for c in subtasks + ["Recall", "Precision"]}
             for name, row in published.items() if name != "Average"}
    for row in cells.values():
        row["F1"] = mmad.f1_percent(row["Precision"], row["Recall"])
    table = mmad.with_averages(cells, subtasks, columns)
    for name, row in published.items():
        for column in columns:
            assert table[name][column] == pytest.approx(row[column], rel=1e-12), (name, column)
    assert table["Average"]["Average"] == pytest.approx(72.19455716252939, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Reports and eval/mmad_score.py


def test_csv_has_the_official_layout():
    lines = mmad.table_csv(mmad.score_answers(fixture_answers())).splitlines()
    assert lines[0] == "," + ",".join(COLUMNS)
    assert lines[1].startswith("DS-MVTec,75.0,0.0,100.0,58.33333333333333")
    assert [line.split(",")[0] for line in lines[1:]] == ["DS-MVTec", "GoodsAD", "VisA", "Average"]


def test_score_recipe_prints_the_table_and_the_left_out_count(tmp_path, capsys):
    answers = tmp_path / "answers_1_shot_model.json"
    answers.write_text(json.dumps(fixture_answers(), indent=4))
    summary = load_recipe("mmad_score").main([str(answers), "--csv", str(tmp_path / "t.csv"),
                                              "--json", str(tmp_path / "t.json")])
    printed = capsys.readouterr().out
    assert "| Dataset | Anomaly Detection | Defect Classification | Object Analysis | Average |" in printed
    assert "| DS-MVTec | 75.00 | 0.00 | 100.00 | 58.33 | 100.00 | 50.00 | 66.67 | 50.00 | 0.00 |" in printed
    assert "| GoodsAD | 25.00 | 100.00 | 100.00 | 75.00 | 50.00 | 100.00 | 66.67 | 100.00 | 50.00 |" in printed
    assert "| VisA | 50.00 | 0.00 | 0.00 | 16.67 | 0.00 | 0.00 | 0.00 | 0.00 | 100.00 |" in printed
    assert "| **Average** | 50.00 | 33.33 | 66.67 | 50.00 | 50.00 | 50.00 | 44.44 | 50.00 | 50.00 |" in printed
    assert "11 of 13 answers scored; left out (letter outside A-E): 1" in printed
    assert "skips the 1 answer(s) right after a left-out one (corrected: 1 left out, 12 scored)" in printed
    assert "quirks corrected the overall average is 75.00 (official rules: 50.00)" in printed
    assert summary["overall"] == pytest.approx(50.0) and summary["corrected"]["overall"] == pytest.approx(75.0)
    assert (tmp_path / "t.csv").read_text() == mmad.table_csv(mmad.score_answers(fixture_answers()))
    assert json.loads((tmp_path / "t.json").read_text())["counts"]["left_out"] == 1

    load_recipe("mmad_score").main([str(answers), "--corrected"])
    printed = capsys.readouterr().out
    assert "| VisA | 100.00 | – | – | 100.00 | – | – | – | 0.00 | – |" in printed


@pytest.mark.parametrize(("content", "message"), [
    ("{}", "expected a JSON list of answers, found dict"),
    ("[1]", "answer 0: expected an object"),
    ('[{"image": "a/b.png", "question_type": "Anomaly Detection", "correct_answer": "A"}]',
     "answer 0: missing 'gpt_answer'"),
    ('[{"image": "", "question_type": "x", "correct_answer": "A", "gpt_answer": "A"}]', "'image' must be a non-empty"),
    ("[{", "malformed JSON"), ("[]", "no answers"),
])
def test_score_recipe_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "answers.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=f"bad input: {path}.*{message}"):
        load_recipe("mmad_score").main([str(path)])
    with pytest.raises(SystemExit, match="answers file does not exist"):
        load_recipe("mmad_score").main([str(tmp_path / "missing.json")])


# --------------------------------------------------------------------------------------------------
# Asking: references, prompt, letters

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
HEAD = ("\nYou are an industrial inspector who checks products by images. You should judge whether there is a defect in "
        "the query image and answer the questions about it.\nAnswer with the option's letter from the given choices "
        "directly.\nAnswer with the option's letter from the given choices directly! ")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TAIL = ("Following is the question list: What type of defect? \nA. Crack.\nB. Break.\nC. Stain.\n"
        "<|im_end|>\n<|im_start|>assistant\n")
EXPECTED_PROMPTS = {
    0: SYSTEM + HEAD + f"Following is the query image: Picture 1: {IMAGE}" + TAIL,
    1: SYSTEM + HEAD + "Following is/are 1 image of normal sample, which can be used as a template to compare the image "
       f"being queried.Picture 1: {IMAGE}Following is the query image: Picture 2: {IMAGE}" + TAIL,
    2: SYSTEM + HEAD + "Following is/are 2 image of normal sample, which can be used as a template to compare the image "
       f"being queried.Picture 1: {IMAGE}Picture 2: {IMAGE}Following is the query image: Picture 3: {IMAGE}" + TAIL,
}


@pytest.mark.parametrize("shots", [0, 1, 2])
def test_prompt_text_is_the_official_layout(tiny_processor, mmad_tree, shots):
    item = list(MMADReader(mmad_tree / "mmad.json").items())[0]
    asked = mmad.asked_question(item.questions[1])
    assert asked.text == "What type of defect? \nA. Crack.\nB. Break.\nC. Stain.\n" and asked.answer == "B"
    references = mmad.mmad_references(item, shots)
    assert len(references) == shots
    text = tiny_processor.apply_chat_template(mmad.mmad_messages(asked.text, len(references)), tokenize=False,
                                              add_generation_prompt=True, add_vision_id=True)
    assert text == EXPECTED_PROMPTS[shots]


def test_references_are_random_templates_first_k_similar_on_request(mmad_tree):
    items = list(MMADReader(mmad_tree / "mmad.json").items())
    relative = lambda paths: [p.relative_to(mmad_tree).as_posix() for p in paths]  # noqa: E731
    assert relative(mmad.mmad_references(items[1], 1)) == ["DS-MVTec/bottle/train/good/r1.png"]
    assert relative(mmad.mmad_references(items[1], 2)) == ["DS-MVTec/bottle/train/good/r1.png",
                                                           "DS-MVTec/bottle/train/good/r0.png"]
    assert relative(mmad.mmad_references(items[1], 2, similar=True)) == ["DS-MVTec/bottle/train/good/s0.png"]
    assert mmad.mmad_references(items[1], 0) == []


def test_options_are_relettered_by_position():
    from iadgpt.data.readers import MultipleChoiceQuestion

    question = MultipleChoiceQuestion("Which?", (("B", "Dent."), ("C", "Crack.")), "C", "Defect Classification")
    asked = mmad.asked_question(question)
    assert asked.options == {"A": "Dent.", "B": "Crack."} and asked.answer == "B"
    assert asked.text == "Which? \nA. Dent.\nB. Crack.\n"


KINDS = {"A": "Crack.", "B": "Break.", "C": "Stain."}


@pytest.mark.parametrize(("response", "expected"), [
    ("B", "B"), ("B.", "B"), ("The answer is C.", "C"),
    ("A. Crack, or maybe B", "B"),            # the last standalone letter wins
    ("B. A crack is visible.", "A"),          # ... even the article "A" (the official regex reads it)
    ("ABC", "A"),                             # no standalone letter: the closest option text, "Crack."
    ("a crack", "A"), ("Broken.", "B"), ("stain", "C"),
    ("F", "C"), ("", "C"),                    # nothing alike: difflib's tie-break takes the largest text
])
def test_parse_answer_letter(response, expected):
    assert mmad.parse_answer_letter(response, KINDS) == expected


def test_parse_answer_letter_without_options_gives_none_and_the_raw_answer_is_kept():
    assert mmad.parse_answer_letter("no idea", {}) is None
    asked = mmad.AskedQuestion("Q \n", {}, "A", "Anomaly Detection")
    assert mmad.answer_entry("DS/x.png", asked, "no idea")["gpt_answer"] == "no idea"


def test_images_are_resized_as_qwen_vl_utils_then_the_processor(tiny_processor, tmp_path):
    from iadgpt.model.checkpoint import pixel_limits, set_pixel_limits

    # 1275 x 850: qwen_vl_utils rounds to 1288 x 840 (46 x 30 x 28). The processor then shrinks that
    # to the MMAD maximum: beta = sqrt(1288 * 840 / (1280 * 784)) = 1.0383, 1288 / beta -> 44 x 28 and
    # 840 / beta -> 28 x 28, so 88 x 56 patches of 14. From the original, beta = 1.0392 and
    # 1275 / beta -> 43 x 28, 850 / beta -> 29 x 28: 86 x 58 patches, another grid.
    Image.fromarray(np.full((850, 1275, 3), 90, dtype=np.uint8)).save(tmp_path / "wide.png")
    image = mmad.official_image(tmp_path / "wide.png", 28)
    assert image.size == (1288, 840) and image.mode == "RGB"
    previous = pixel_limits(tiny_processor)
    set_pixel_limits(tiny_processor, mmad.MMAD_MIN_PIXELS, mmad.MMAD_MAX_PIXELS)
    try:
        grid = lambda picture: tiny_processor.image_processor(images=[picture], return_tensors="pt")[  # noqa: E731
            "image_grid_thw"][0].tolist()
        assert grid(image) == [1, 56, 88]
        assert grid(Image.open(tmp_path / "wide.png")) == [1, 58, 86]
    finally:
        set_pixel_limits(tiny_processor, *previous)
    # A size already on the grid is left as it is; an RGBA image is composited on white, as
    # qwen_vl_utils does (Pillow's convert would keep the hidden colour of a transparent pixel).
    rgba = np.zeros((56, 84, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :42, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    image = mmad.official_image(tmp_path / "alpha.png", 28)
    assert image.size == (84, 56)
    assert image.getpixel((0, 0)) == (200, 0, 0) and image.getpixel((83, 55)) == (255, 255, 255)
    with pytest.raises(DataError, match=r"missing\.png: image file does not exist"):
        mmad.official_image(tmp_path / "missing.png", 28)


# --------------------------------------------------------------------------------------------------
# eval/reasoning.py --mmad end to end, tiny random-weight model


def test_reasoning_recipe_mmad_end_to_end(tiny_checkpoint, mmad_tree, tmp_path, monkeypatch):
    import iadgpt.dialogue as dialogue

    calls = []
    real_generate = dialogue.generate_text

    def counting_generate(model, processor, inputs, max_new_tokens=256, **options):
        calls.append(int(inputs["input_ids"].shape[0]))
        return real_generate(model, processor, inputs, max_new_tokens, **options)

    monkeypatch.setattr(dialogue, "generate_text", counting_generate)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_checkpoint), "--mmad", str(mmad_tree / "mmad.json"), "--out", str(out),
            "--shots", "2", "--mmad-max-new-tokens", "3", "--batch-size", "5"]
    results = load_recipe("reasoning").main(argv)["mmad"]
    assert sum(calls) == 13 and len(calls) == 3  # every question on its own, 5 per batch

    predictions = [json.loads(line) for line in (out / "mmad_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 13
    assert predictions[3]["references"] == ["DS-MVTec/bottle/train/good/r1.png", "DS-MVTec/bottle/train/good/r0.png"]
    assert predictions[6]["references"] == ["DS-MVTec/bottle/train/good/r0.png"]  # fewer templates than k: what there is
    assert results["short_reference_items"] == 4 and results["references"] == "random_templates"

    answers = json.loads((out / "mmad_answers.json").read_text())
    assert [set(a) for a in answers] == [set(mmad.ANSWER_FIELDS)] * 13
    assert [a["image"] for a in answers] == [image for image, r in MMAD_DOCUMENT.items() for _ in r["conversation"]]
    assert [a["question_type"] for a in answers][:3] == ["Anomaly Detection", "Defect Classification",
                                                         "Object Structure"]
    assert answers[8]["question"]["text"] == "What type of defect? \nA. Dent.\nB. Stain.\nC. Tear.\nD. Scratch.\n"
    assert answers[8]["correct_answer"] == "D"
    for answer, prediction in zip(answers, predictions):
        letter = mmad.parse_answer_letter(prediction["response"], prediction["options"])
        assert answer["gpt_answer"] == (letter if letter is not None else prediction["response"])
    # The tables written beside it are the answers file's, scored by the official rules.
    score = mmad.score_answers(answers)
    assert (out / "mmad_accuracy.csv").read_text() == mmad.table_csv(score)
    assert (out / "mmad_accuracy.md").read_text().startswith("# MMAD, 2-shot (random_templates)")
    assert results["overall"] == score.overall and results["counts"]["answers"] == 13
    assert results["columns"] == COLUMNS
    assert (results["min_pixels"], results["max_pixels"], results["vision_ids"]) == (64 * 28 * 28, 1280 * 28 * 28,
                                                                                       True)
    written = json.loads((out / "results.json").read_text())["mmad"]
    assert written["counts"] == results["counts"]

    # Resumed: nothing is asked again; with other references the recorded answers are refused.
    calls.clear()
    load_recipe("reasoning").main(argv)
    assert calls == []
    with pytest.raises(SystemExit, match="mmad_predictions.jsonl.*references.*other data"):
        load_recipe("reasoning").main([*argv, "--similar-templates"])
    similar = load_recipe("reasoning").main([*argv[:-4], "--out", str(tmp_path / "similar"), "--similar-templates",
                                             "--shots", "1", "--mmad-max-new-tokens", "2", "--limit", "1"])["mmad"]
    first = json.loads((tmp_path / "similar" / "mmad_predictions.jsonl").read_text().splitlines()[0])
    assert first["references"] == ["DS-MVTec/bottle/train/good/s0.png"] and similar["references"] == "similar_templates"


def test_reasoning_recipe_mmad_bad_input_names_the_file(tiny_checkpoint, mmad_tree, tmp_path):
    (mmad_tree / "DS-MVTec/bottle/train/good/r1.png").write_bytes(b"not a png")
    argv = ["--model", str(tiny_checkpoint), "--mmad", str(mmad_tree / "mmad.json"), "--out", str(tmp_path / "out"),
            "--mmad-max-new-tokens", "2"]
    with pytest.raises(SystemExit, match=r"bad input: .*r1\.png.*not a readable image"):
        load_recipe("reasoning").main([*argv, "--shots", "2"])
    (mmad_tree / "mmad.json").write_text(json.dumps({"DS-MVTec/bottle/image/good/404.png": MMAD_DOCUMENT[
        "DS-MVTec/bottle/image/good/002.png"]}))
    with pytest.raises(SystemExit, match=r"bad input: .*mmad\.json.*404\.png does not exist"):
        load_recipe("reasoning").main(argv)


def test_resolution_is_restored_after_the_run(tiny_checkpoint, mmad_tree, tmp_path, monkeypatch):
    from iadgpt.inspection import Inspector
    from iadgpt.model.checkpoint import pixel_limits

    inspector = Inspector.from_pretrained(tiny_checkpoint)
    before = pixel_limits(inspector.processor)
    loaded = []

    def official_image(path, factor):
        loaded.append((Path(path).relative_to(mmad_tree).as_posix(), factor))
        return real_official_image(path, factor)

    real_official_image = mmad.official_image
    monkeypatch.setattr(mmad, "official_image", official_image)
    mmad.run_mmad(inspector.model, inspector.processor, mmad_tree / "mmad.json", tmp_path / "out", shots=1,
                  max_new_tokens=1, limit=1, batch_size=1)
    assert pixel_limits(inspector.processor) == before
    # Every image goes through qwen_vl_utils' resize first, on the processor's 28-px grid, once for
    # all three questions of the item (each asked in a batch of its own).
    reference, query = "DS-MVTec/bottle/train/good/r0.png", "DS-MVTec/bottle/image/broken/000.png"
    assert loaded == [(reference, 28), (query, 28)]
    assert len((tmp_path / "out" / mmad.MMAD_PREDICTIONS_FILE).read_text().splitlines()) == 3
    with pytest.raises(DataError, match="no MMAD items"):
        (mmad_tree / "empty.json").write_text("{}")
        mmad.run_mmad(inspector.model, inspector.processor, mmad_tree / "empty.json", tmp_path / "out2")
