"""Reasoning benchmark: VisA-D&R (SBERT, text detection accuracy, optional GPT-score) and MMAD.

    python eval/reasoning.py --model DIR --data visa_dr.json --image-root VISA_ROOT --out OUT
    python eval/reasoning.py --model DIR --data visa_dr.json --image-root VISA_ROOT --out OUT \\
        --normals-root VISA_ROOT --normals-dataset visa --shots 1          # few-shot references
    python eval/reasoning.py --model DIR --mmad mmad.json --mmad-root MMAD_ROOT --out OUT --shots 1 \
        [--similar-templates]
    ... --gpt-score-url https://api.openai.com/v1 --gpt-score-model gpt-4o   # key: $OPENAI_API_KEY

Writes OUT/predictions.jsonl (one line per answered question) and OUT/results.json, and prints the
results. A re-run with the same OUT answers only what is missing.
MMAD follows the official protocol (references random_templates[:k], the official prompt, images of
64x28x28 .. 1280x28x28 pixels unless --min/max-pixels say otherwise, the official letter parsing and
table): OUT/mmad_predictions.jsonl, OUT/mmad_answers.json (the official answers-file format, which
eval/mmad_score.py scores), OUT/mmad_accuracy.csv and .md. Rules: docs/mmad.md.
Rules for reading yes/no answers and the GPT-score prompt: iadgpt/evaluation/reasoning.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from iadgpt.data.samples import DataError
from iadgpt.evaluation import mmad, reasoning
from iadgpt.inspection import Inspector
from iadgpt.model.checkpoint import (DEVICE_HELP, DeviceError, add_pixel_limit_arguments, check_pixel_limits,
                                     device_and_dtype)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="IADGPT or Qwen2.5-VL checkpoint (folder or hub name)")
    parser.add_argument("--data", help="VisA-D&R file (JSON array or JSONL of detection and reasoning items)")
    parser.add_argument("--image-root", help="folder the VisA-D&R image paths are relative to (default: its folder)")
    parser.add_argument("--out", required=True, help="output folder (predictions are resumed from it)")
    parser.add_argument("--sbert", default=reasoning.DEFAULT_SBERT,
                        help="sentence-transformers model, name or path (default: all-MiniLM-L6-v2, shipped offline)")
    parser.add_argument("--normals-root", help="dataset whose train-split normals are the few-shot references "
                                               "of each VisA-D&R category (default: zero-shot)")
    parser.add_argument("--normals-dataset", default="visa", help="layout of --normals-root: visa, mvtec, meta, folder")
    parser.add_argument("--shots", type=int, default=1, help="normal references per query (VisA-D&R with "
                                                             "--normals-root, and MMAD templates)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-category draw of references")
    parser.add_argument("--gpt-score-url",
                        help="OpenAI-compatible API base, e.g. https://api.openai.com/v1 (off by default)")
    parser.add_argument("--gpt-score-model", help="judge model name at --gpt-score-url, e.g. gpt-4o")
    parser.add_argument("--gpt-score-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the endpoint's API key (sent only if set)")
    parser.add_argument("--gpt-score-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--mmad", help="MMAD file (mmad.json): multiple choice, official protocol and table")
    parser.add_argument("--mmad-root", help="folder the MMAD paths are relative to (default: its folder)")
    parser.add_argument("--similar-templates", action="store_true",
                        help="MMAD references: similar_templates[:k] instead of the official default "
                             "random_templates[:k]")
    parser.add_argument("--mmad-max-new-tokens", type=int, default=mmad.MMAD_MAX_NEW_TOKENS,
                        help=f"MMAD answer length limit (default: {mmad.MMAD_MAX_NEW_TOKENS}, as the official script)")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations generated together")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (VisA-D&R)")
    parser.add_argument("--limit", type=int, help="only the first N items of each file (a quick look)")
    add_pixel_limit_arguments(parser)
    parser.add_argument("--device", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    try:
        args.device, _ = device_and_dtype(args.device)
    except DeviceError as err:
        parser.error(f"--device: {err}")
    if not args.data and not args.mmad:
        parser.error("give --data (VisA-D&R) and/or --mmad")
    if args.shots < 0:
        parser.error(f"--shots {args.shots}: the number of references cannot be negative")
    if args.mmad:
        try:
            check_pixel_limits(args.min_pixels or mmad.MMAD_MIN_PIXELS, args.max_pixels or mmad.MMAD_MAX_PIXELS)
        except ValueError as err:
            parser.error(f"MMAD pixel limits: {err}")
    if bool(args.gpt_score_url) != bool(args.gpt_score_model):
        parser.error("--gpt-score-url and --gpt-score-model go together")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        inspector = Inspector.from_pretrained(args.model, device=args.device, min_pixels=args.min_pixels,
                                              max_pixels=args.max_pixels)
    except ValueError as err:  # a bad pixel limit or model folder
        raise SystemExit(f"eval/reasoning.py: {err}") from None
    results: dict = {"model": args.model}
    try:
        if args.data:
            normals = (reasoning.CategoryNormals(args.normals_dataset, args.normals_root, args.shots, args.seed)
                       if args.normals_root else None)
            scorer = (reasoning.GPTScorer(args.gpt_score_url, args.gpt_score_model,
                                          api_key=os.environ.get(args.gpt_score_key_env),
                                          timeout=args.gpt_score_timeout) if args.gpt_score_url else None)
            summary = reasoning.run_visa_dr(
                inspector.model, inspector.processor, args.data, args.out, image_root=args.image_root,
                detection_question=inspector.question.text, defect_answer=inspector.question.defect_answer,
                sentence_model=reasoning.load_sentence_model(args.sbert), normals=normals, gpt_scorer=scorer,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit)
            results.update(summary, sbert_model=args.sbert, shots=args.shots if normals else 0,
                           gpt_score_model=args.gpt_score_model)
        if args.mmad:
            # The official resolution for this benchmark unless the command line sets one.
            results["mmad"] = mmad.run_mmad(
                inspector.model, inspector.processor, args.mmad, args.out, image_root=args.mmad_root,
                shots=args.shots, similar_templates=args.similar_templates, batch_size=args.batch_size,
                max_new_tokens=args.mmad_max_new_tokens, limit=args.limit,
                min_pixels=args.min_pixels or mmad.MMAD_MIN_PIXELS, max_pixels=args.max_pixels or mmad.MMAD_MAX_PIXELS)
    except DataError as err:
        raise SystemExit(f"eval/reasoning.py: bad input: {err}") from None
    reasoning.write_results(args.out, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
