"""Score an MMAD answers file by the official rules and print the per-dataset x subtask table.

    python eval/mmad_score.py ANSWERS.json [--corrected] [--csv OUT.csv] [--markdown OUT.md] [--json OUT.json]

ANSWERS.json: a JSON list of {"image", "question", "question_type", "correct_answer", "gpt_answer"},
as written by the official MMAD query scripts or by `eval/reasoning.py --mmad` (OUT/mmad_answers.json).
The table follows the official summary.py (caculate_accuracy_mmad), its quirks included, so the
numbers compare with published tables; the count of answers left out (letter outside A-E) is printed
below it, with the overall figure once the quirks are corrected (--corrected: that whole table).
Rules and where each comes from: docs/mmad.md; the code: iadgpt/evaluation/mmad.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iadgpt.data.samples import DataError
from iadgpt.evaluation import mmad


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("answers", help="answers file (JSON list in the official format)")
    parser.add_argument("--corrected", action="store_true",
                        help="also print the table with the official script's quirks corrected")
    parser.add_argument("--csv", help="write the official table here as CSV (the official *_accuracy.csv layout)")
    parser.add_argument("--markdown", help="write the printed tables here")
    parser.add_argument("--json", help="write both tables and the counts here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        answers = mmad.load_answers(args.answers)
    except DataError as err:
        raise SystemExit(f"eval/mmad_score.py: bad input: {err}") from None
    text, summary = mmad.report(answers, title=Path(args.answers).name, corrected_table=args.corrected)
    print(text, end="")
    if args.csv:
        Path(args.csv).write_text(mmad.table_csv(mmad.score_answers(answers)), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
