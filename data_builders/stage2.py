"""Stage 2 records: discrepancy awareness, with real and synthetic (CutPaste, scar, Perlin) defects.

    python data_builders/stage2.py --dataset factory=mvtec:data/factory --records 3000 \
        --replay data/stage1 --replay-ratio 0.5 --out data/stage2

Three proxy tasks in turn: the odd image out of a group of one product, the regions where two
images of one product differ, and the irregular region of a single image (regions in
Qwen2.5-VL's bbox_2d format). `--replay` mixes in a share of the previous stage's records
(paper: 50% of stage 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iadgpt.data.samples import DataError
from iadgpt.data.builders import (
    DatasetSource,
    Stage2Options,
    SyntheticDefects,
    benchmark_test_images,
    index_sources,
    replayed,
    stage2_records,
    stage_roots,
    write_stage,
)
from iadgpt.data.tasks import ResizeRule


def main(argv=None) -> None:
    try:
        build(argv)
    except (DataError, ValueError) as err:  # bad input: one clear line, no traceback
        sys.exit(f"stage2.py: {err}")


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="[NAME=]KIND:ROOT",
                        help="kind: mvtec, visa, realiad, meta or folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, default=1000, help="new records (replay comes on top)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--synthetic-fraction", type=float, default=0.5)
    parser.add_argument("--replay", help="earlier stage folder to mix in")
    parser.add_argument("--replay-ratio", type=float, default=0.5)
    parser.add_argument("--benchmark", action="append", default=[], metavar="KIND:ROOT")
    parser.add_argument("--max-pixels", type=int, default=28 * 28 * 1280, help="the target processor's max_pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out (and count) unusable samples instead of stopping at the first")
    args = parser.parse_args(argv)

    out = Path(args.out)
    sources = [DatasetSource.parse(d) for d in args.dataset]
    held_out = benchmark_test_images([DatasetSource.parse(b) for b in args.benchmark])
    pools = index_sources(sources, held_out, skip_bad=args.skip_bad)
    options = Stage2Options(records=args.records, group_size=args.group_size,
                            synthetic_fraction=args.synthetic_fraction, resize=ResizeRule(max_pixels=args.max_pixels))
    roots = stage_roots(out, sources)
    records = stage2_records(pools, SyntheticDefects(out / "synthetic", pools), options, args.seed)
    total = args.records
    if args.replay:
        replay_roots, replay_records = replayed(Path(args.replay), args.replay_ratio, args.seed)
        roots.update(replay_roots)
        records = (r for part in (records, replay_records) for r in part)
        total = None
    info = write_stage(out, 2, roots, records, held_out, args.records_per_shard, resume=not args.restart,
                       config=vars(args), progress_total=total)
    print(f"Wrote {info.num_records} stage-2 records in {len(info.shards)} shards to {out}")


if __name__ == "__main__":
    main()
