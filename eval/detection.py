"""Few-shot detection and localisation benchmark (image/pixel AUROC, AP, F1-max, AUPRO).

    python eval/detection.py --model DIR --dataset mvtec --root PATH --shots 0 1 2 4 --seeds 3 --out OUT
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval/detection.py ...   # CPU
    accelerate launch --num_processes 8 eval/detection.py ...                                       # GPUs

The story of a run:
  1. every category's queries (its test images) and, per k and seed, k normal references drawn from
     its train split are fixed and written to OUT/manifest.json (`--manifest` replays one);
  2. the data is checked before the model loads: every image readable, every mask present and of
     its image's size, enough normals for every k;
  3. each query gets one forward pass (score + pixel map, no text), batched and split over the
     processes; results go to OUT/cache/ after every batch, so rerunning the same command after an
     interruption scores only what is missing;
  4. rank 0 computes the metrics per category, their mean, and mean +- std over seeds, and writes
     results.json / .csv / .md, overlays/ and plots/.
The protocol's details (normalisation, AUPRO definition, evaluation resolution) are in
iadgpt/evaluation/detection.py.
"""

from __future__ import annotations

import argparse
import sys

from iadgpt.data.readers import DATASET_KINDS
from iadgpt.data.samples import DataError
from iadgpt.evaluation.detection import DetectionSettings, DetectionSetupError, distributed_state, run_detection
from iadgpt.model.checkpoint import add_pixel_limit_arguments


def parse_settings(argv: list[str] | None = None) -> DetectionSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (iadgpt or Qwen2.5-VL)")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASET_KINDS), help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4], help="numbers of normal references k")
    parser.add_argument("--seeds", type=int, default=3, help="few-shot draws per k > 0 (k = 0 runs once)")
    parser.add_argument("--manifest", help="manifest.json of an earlier run: replay its references and queries")
    parser.add_argument("--batch-size", type=int, default=4, help="queries per forward pass")
    parser.add_argument("--categories", nargs="+", help="only these categories")
    parser.add_argument("--max-queries-per-category", type=int, help="score a class-proportional subset")
    parser.add_argument("--map-size", type=int, default=256, help="long side of maps and masks when compared")
    parser.add_argument("--overlays-per-category", type=int, default=4, help="heatmap overlays per category")
    add_pixel_limit_arguments(parser)
    args = parser.parse_args(argv)
    return DetectionSettings(
        model=args.model, dataset=args.dataset, root=args.root, out=args.out, shots=args.shots, seeds=args.seeds,
        manifest=args.manifest, batch_size=args.batch_size, categories=args.categories,
        max_queries_per_category=args.max_queries_per_category, map_size=args.map_size,
        overlays_per_category=args.overlays_per_category, min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    state = distributed_state()
    try:
        run_detection(settings)
    except (DataError, DetectionSetupError) as error:  # every rank checks the same data: one message is enough
        sys.exit(f"detection.py: {error}" if state.is_main_process else 1)
    state.wait_for_everyone()
    state.destroy_process_group()  # a clean exit: gloo may abort a process that exits with the group alive


if __name__ == "__main__":
    main()
