"""Stage 1 records: industrial image-caption pairs.

    python data_builders/stage1.py --captions factory=data/factory/captions.jsonl --out data/stage1

Each `--captions name=FILE` is a JSONL of {"image": path relative to FILE's folder, "caption": text}
(the synthetic factory writes one; write your own for your images, or fill one from a vision
endpoint with `iadgpt.data.captioning`). Images of `--benchmark` test splits are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iadgpt.data.samples import DataError
from iadgpt.data.builders import DatasetSource, benchmark_test_images, stage1_records, write_stage


def main(argv=None) -> None:
    try:
        build(argv)
    except (DataError, ValueError) as err:  # bad input: one clear line, no traceback
        sys.exit(f"stage1.py: {err}")


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", action="append", required=True, metavar="NAME=FILE",
                        help="a captions.jsonl; NAME becomes its root key (default: the folder name)")
    parser.add_argument("--out", required=True, help="stage folder to write")
    parser.add_argument("--benchmark", action="append", default=[], metavar="KIND:ROOT",
                        help="a benchmark dataset whose test split must never appear in training records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--restart", action="store_true", help="rebuild from scratch instead of resuming")
    args = parser.parse_args(argv)

    files = []
    for spec in args.captions:
        name, _, path = spec.rpartition("=")
        path = Path(path).resolve()
        files.append((name or path.parent.name, path))
    roots = {name: str(path.parent) for name, path in files}
    held_out = benchmark_test_images([DatasetSource.parse(b) for b in args.benchmark])
    info = write_stage(Path(args.out), 1, roots, stage1_records(files, args.seed, held_out, roots), held_out,
                       args.records_per_shard, resume=not args.restart, config=vars(args))
    print(f"Wrote {info.num_records} stage-1 records in {len(info.shards)} shards to {args.out}")


if __name__ == "__main__":
    main()
