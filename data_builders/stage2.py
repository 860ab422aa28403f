"""Stage 2 records: discrepancy awareness, with real and synthetic (CutPaste, scar, Perlin) defects.

    python data_builders/stage2.py --dataset factory=mvtec:data/factory --records 3000 \\
        --replay data/stage1 --replay-ratio 0.5 --out data/stage2

Three proxy tasks in turn: the odd image out of a group of one product, the regions where two
images of one product differ, and the irregular region of a single image (regions in
Qwen2.5-VL's bbox_2d format). `--replay` mixes in a share of the previous stage's records
(paper: 50% of stage 1). Boxes are pixels of the image as the trained model's processor resizes it:
`--model` reads its limits (default: the released Qwen2.5-VL processor's), `--min-pixels` /
`--max-pixels` change them; training then needs the same (`min_pixels` / `max_pixels`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iadgpt.data.builders import (
    Stage2Options,
    SyntheticDefects,
    add_dataset_arguments,
    indexed_sources,
    pixel_rule,
    run_builder,
    stage2_records,
    stage_roots,
    write_with_replay,
)


def main(argv=None) -> None:
    run_builder(build, "stage2.py", argv)


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser, replay_ratio=0.5)
    parser.add_argument("--group-size", type=int, default=4, help="images per odd-one-out group")
    parser.add_argument("--synthetic-fraction", type=float, default=0.5, help="share of synthetic defects")
    args = parser.parse_args(argv)

    out = Path(args.out)
    sources, held_out, pools = indexed_sources(args)
    resize = pixel_rule(args)
    options = Stage2Options(records=args.records, group_size=args.group_size,
                            synthetic_fraction=args.synthetic_fraction, resize=resize)
    records = stage2_records(pools, SyntheticDefects(out / "synthetic", pools), options, args.seed)
    info = write_with_replay(args, 2, stage_roots(out, sources), records, held_out, pixels=resize)
    print(f"Wrote {info.num_records} stage-2 records in {len(info.shards)} shards to {out}")


if __name__ == "__main__":
    main()
