"""Stage 3 records: few-shot (1/2/4) in-context detection, localization and reasoning.

    python data_builders/stage3.py --dataset factory=mvtec:data/factory --records 3000 \\
        --replay data/stage2 --replay-ratio 0.8 --out data/stage3

Every record shows k normal exemplars of the query's product, then the query, then a question:
whether it is defective (answered "Yes"/"No" first: the image score), where (bbox_2d boxes; the
query's mask also feeds the pixel loss), or what the defect is (answered with the dataset's
caption of that image, where it has one). `--abnormal-references N` also shows N defective
examples of the product (as in NAGL). `--synthetic-fraction F` makes a share F of the defective
queries from normal images (CutPaste / scar / texture blend, with masks, as stage 2 does), and all of
them for a product without real defects: a folder of normal images alone then makes stage-3 records. `--replay` mixes in a share of stage 2 (paper: 80%). Boxes
are pixels of the image as the trained model's processor resizes it: `--model` reads its limits
(default: the released Qwen2.5-VL processor's), `--min-pixels` / `--max-pixels` change them;
training then needs the same (`min_pixels` / `max_pixels`).
"""

from __future__ import annotations

import argparse
from itertools import chain
from pathlib import Path

from iadgpt.data.builders import (
    Stage3Options,
    SyntheticDefects,
    add_dataset_arguments,
    indexed_sources,
    instruction_records,
    load_captions,
    pixel_rule,
    run_builder,
    stage3_records,
    stage_roots,
    write_with_replay,
)
from iadgpt.data.readers import LLaVAConversationReader


def main(argv=None) -> None:
    run_builder(build, "stage3.py", argv)


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser, replay_ratio=0.8)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4], help="exemplar counts, used in turn")
    parser.add_argument("--abnormal-references", type=int, default=0, help="defective examples shown (NAGL)")
    parser.add_argument("--synthetic-fraction", type=float, default=0.0,
                        help="share of defective queries synthesised from normals (all, for products without defects)")
    parser.add_argument("--categories", nargs="*", help="only these categories")
    parser.add_argument("--instructions", action="append", default=[], metavar="FILE",
                        help="LLaVA-style instruction data (Anomaly-Instruct-125k JSON/JSONL) for reasoning records")
    parser.add_argument("--instructions-root", help="folder its image paths are relative to (default: its folder)")
    parser.add_argument("--instruction-shots", type=int, nargs="+", default=[1, 2, 4],
                        help="normal references shown before instruction images of a known category")
    args = parser.parse_args(argv)

    sources, held_out, pools = indexed_sources(args, set(args.categories) if args.categories else None)
    resize = pixel_rule(args)
    options = Stage3Options(records=args.records, shots=tuple(args.shots), abnormal_references=args.abnormal_references,
                            synthetic_fraction=args.synthetic_fraction, resize=resize)
    out = Path(args.out)
    synth = SyntheticDefects(out / "synthetic", pools) if args.synthetic_fraction > 0 else None
    records = stage3_records(pools, options, args.seed, load_captions(sources), synth)
    roots = stage_roots(out, sources) if synth else {s.name: str(s.root) for s in sources}
    for number, path in enumerate(args.instructions):
        image_root = Path(args.instructions_root or Path(path).parent)
        reader = LLaVAConversationReader(path, image_root=image_root, skip_bad=args.skip_bad)
        roots[f"instructions{number}"] = str(image_root.resolve())
        records = chain(records, instruction_records(reader.conversations(), image_root, pools,
                                                     args.instruction_shots, args.seed, f"instructions{number}"))
    info = write_with_replay(args, 3, roots, records, held_out, pixels=resize)
    print(f"Wrote {info.num_records} stage-3 records in {len(info.shards)} shards to {out}")


if __name__ == "__main__":
    main()
