"""Stage 1 records: industrial image-caption pairs.

    python data_builders/stage1.py --captions factory=data/factory/captions.jsonl --out data/stage1

Each `--captions name=FILE` is a JSONL of {"image": path relative to FILE's folder, "caption": text}
(the synthetic factory writes one; write your own for your images). With `--caption-endpoint URL
--caption-model NAME --caption-images DIR`, the images under DIR without a caption are first
described by that OpenAI-compatible vision endpoint into DIR/captions.jsonl (off by default; the
key is read from $OPENAI_API_KEY). Images of `--benchmark` test splits are left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iadgpt.data.captioning import caption_folder
from iadgpt.data.builders import DatasetSource, benchmark_test_images, run_builder, stage1_records, write_stage
from iadgpt.data.samples import IMAGE_EXTENSIONS


def main(argv=None) -> None:
    run_builder(build, "stage1.py", argv)


def build(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", action="append", default=[], metavar="NAME=FILE",
                        help="a captions.jsonl; NAME becomes its root key (default: the folder name)")
    parser.add_argument("--out", required=True, help="stage folder to write")
    parser.add_argument("--benchmark", action="append", default=[], metavar="KIND:ROOT",
                        help="a benchmark dataset whose test split must never appear in training records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--restart", action="store_true", help="rebuild from scratch instead of resuming")
    parser.add_argument("--caption-endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--caption-model", help="model name at the endpoint")
    parser.add_argument("--caption-images", help="folder whose images get captions from the endpoint")
    args = parser.parse_args(argv)

    if args.caption_endpoint:
        if not (args.caption_model and args.caption_images):
            raise ValueError("--caption-endpoint needs --caption-model and --caption-images")
        folder = Path(args.caption_images)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and "ground_truth" not in p.parts)
        added = caption_folder(images, folder, folder / "captions.jsonl", args.caption_endpoint, args.caption_model)
        print(f"Captioned {added} images through {args.caption_endpoint}")
        args.captions.append(f"{folder.name}={folder / 'captions.jsonl'}")

    if not args.captions:
        raise ValueError("give at least one --captions NAME=FILE (or --caption-endpoint ...)")
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
