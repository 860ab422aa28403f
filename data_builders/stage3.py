"""Stage 3 records: few-shot (1/2/4) in-context detection, localization and reasoning.

    python data_builders/stage3.py --dataset factory=mvtec:data/factory --records 3000 \
        --replay data/stage2 --replay-ratio 0.8 --out data/stage3

Every record shows k normal exemplars of the query's product, then the query, then a question:
whether it is defective (answered "Yes"/"No" first: the image score), where (bbox_2d boxes; the
query's mask also feeds the pixel loss), or what the defect is (answered with the dataset's
caption of that image, where it has one). `--abnormal-references N` also shows N defective
examples of the product (as in NAGL). `--replay` mixes in a share of stage 2 (paper: 80%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iadgpt.data.samples import DataError
from iadgpt.data.builders import (
    DatasetSource,
    Stage3Options,
    benchmark_test_images,
    index_sources,
    load_captions,
    replayed,
    stage3_records,
    write_stage,
)
from iadgpt.data.tasks import ResizeRule


def main(argv=None) -> None:
    try:
        build(argv)
    except (DataError, ValueError) as err:  # bad input: one clear line, no traceback
        sys.exit(f"stage3.py: {err}")


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="[NAME=]KIND:ROOT")
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", type=int, default=1000, help="new records (replay comes on top)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--abnormal-references", type=int, default=0)
    parser.add_argument("--categories", nargs="*", help="only these categories")
    parser.add_argument("--replay", help="earlier stage folder to mix in")
    parser.add_argument("--replay-ratio", type=float, default=0.8)
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
    pools = index_sources(sources, held_out, set(args.categories) if args.categories else None, args.skip_bad)
    options = Stage3Options(records=args.records, shots=tuple(args.shots), abnormal_references=args.abnormal_references,
                            resize=ResizeRule(max_pixels=args.max_pixels))
    roots = {s.name: str(s.root) for s in sources}
    records = stage3_records(pools, options, args.seed, load_captions(sources))
    total = args.records
    if args.replay:
        replay_roots, replay_records = replayed(Path(args.replay), args.replay_ratio, args.seed)
        roots.update(replay_roots)
        records = (r for part in (records, replay_records) for r in part)
        total = None
    info = write_stage(out, 3, roots, records, held_out, args.records_per_shard, resume=not args.restart,
                       config=vars(args), progress_total=total)
    print(f"Wrote {info.num_records} stage-3 records in {len(info.shards)} shards to {out}")


if __name__ == "__main__":
    main()
