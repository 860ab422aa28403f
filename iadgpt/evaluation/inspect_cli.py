"""`iadgpt inspect`: score query images against a few normal references, write scores and overlays.

    iadgpt inspect --model DIR --normals good/ --query 'line3/*.png' --out OUT [--threshold 0.5] [--device cuda:1]
    iadgpt inspect --product bracket --query incoming/ --out OUT     # a stored product (`iadgpt product`)

Writes `OUT/scores.csv` (path, score, label at the threshold, overlay file) and one heatmap overlay
PNG per query in `OUT/overlays/`. The score is the model's probability that the query is defective
(with the setting `residuals.image_score_map_weight`, fused with the map's maximum in logit space), so 0.5 is
the neutral threshold; a line that wants fewer escapes lowers it. A calibrated product brings its own
threshold (`iadgpt product calibrate`); `--threshold` overrides it. The overlay shows the
model's per-pixel probability as is (no per-image stretching, which would paint every defect-free
part red somewhere). Rows are written as each batch finishes, so an interrupted run keeps what it
scored. Paths may be files, folders (their image files, not recursive) or glob patterns.
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

from ..data.samples import IMAGE_EXTENSIONS, DataError, load_image
from ..model.checkpoint import DEVICE_HELP

__all__ = ["add_arguments", "expand_image_paths", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="checkpoint folder (iadgpt or Qwen2.5-VL); with --product, its own")
    parser.add_argument("--normals", nargs="+", metavar="PATH",
                        help="normal reference images of the product: files, folders or globs")
    parser.add_argument("--product", help="a stored product (references, model, threshold) instead of "
                                          "--normals / --model")
    parser.add_argument("--products", help="products folder (default: $IADGPT_PRODUCTS, else ./products)")
    parser.add_argument("--query", nargs="+", required=True, metavar="PATH",
                        help="images to inspect: files, folders or globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float,
                        help="a query is labelled anomalous when its score is >= this (default: the product's "
                             "calibrated threshold, else 0.5)")
    parser.add_argument("--batch-size", type=int, default=4, help="queries per forward pass")
    from ..model.checkpoint import add_pixel_limit_arguments

    add_pixel_limit_arguments(parser)
    parser.add_argument("--device", help=DEVICE_HELP)
    return parser


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def expand_image_paths(patterns: list[str], what: str) -> list[Path]:
    """Files as given, folders as their image files, globs as their matching image files; sorted
    within a folder or glob, in argument order overall, without repeats. A pattern that yields no
    image is an error naming it (a typo must not silently inspect nothing)."""
    paths: list[Path] = []
    for pattern in patterns:
        candidate = Path(pattern).expanduser()
        if candidate.is_dir():
            found = sorted(p for p in candidate.iterdir() if _is_image(p))
        elif candidate.is_file():
            found = [candidate]  # named explicitly: decoding will say if it is not an image
        else:
            found = sorted(p for p in map(Path, glob.glob(str(candidate), recursive=True)) if _is_image(p))
        if not found:
            raise DataError(f"{what} {pattern!r}: no image file there (files, folders and glob patterns are accepted)")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def _overlay_names(paths: list[Path]) -> list[str]:
    """`<stem>.png` per query, `<stem>_2.png` ... when stems repeat across folders."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}.png" if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}.png")
    return names


_NOTED_SIZES: set = set()


def _note_sizes(references, queries) -> None:
    """Say once per pair of sizes when references and queries differ in size (allowed, and how it goes)."""
    for reference in references:
        for query in queries:
            pair = (reference.size, query.size)
            if reference.size != query.size and pair not in _NOTED_SIZES:
                _NOTED_SIZES.add(pair)
                print(f"note: a reference is {reference.size[0]}x{reference.size[1]} px and a query "
                      f"{query.size[0]}x{query.size[1]} px; each image is resized on its own to multiples of 28 px "
                      "within the processor's pixel limits, so their visual tokens cover different areas",
                      file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Inspect every query; user errors (paths, images, model folder) exit with a message naming them."""
    from ..inspection import Inspector, heatmap_overlay
    from ..model.checkpoint import DeviceError, check_checkpoint, device_and_dtype

    if args.batch_size < 1:
        raise SystemExit(f"iadgpt inspect: --batch-size must be >= 1, got {args.batch_size}")
    try:
        device, _ = device_and_dtype(args.device)
    except DeviceError as error:
        raise SystemExit(f"iadgpt inspect: --device: {error}") from error
    abnormal: list = []
    try:
        if args.product:
            from ..products import ProductStore

            if args.normals:
                raise ValueError("--normals with --product: the product's own references are used")
            product = ProductStore(args.products).get(args.product)
            args.model = args.model or product.model
            check_checkpoint(args.model)
            product.check_model(args.model)
            normals, abnormal = product.normal_images(), product.abnormal_images()
            if args.threshold is None and product.threshold is not None:
                args.threshold = product.threshold
        elif not args.model or not args.normals:
            raise ValueError("give --model and --normals, or --product")
        else:
            check_checkpoint(args.model)
            normals = [load_image(path) for path in expand_image_paths(args.normals, "--normals")]
        queries = expand_image_paths(args.query, "--query")
    except (DataError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"iadgpt inspect: {error}") from error
    args.threshold = 0.5 if args.threshold is None else args.threshold
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    try:
        inspector = Inspector.from_pretrained(args.model, device=device, batch_size=args.batch_size,
                                              min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except ValueError as error:  # a bad pixel limit
        raise SystemExit(f"iadgpt inspect: {error}") from error
    flagged = 0
    with (out / "scores.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "score", "label", "overlay"])
        names = _overlay_names(queries)
        for start in range(0, len(queries), args.batch_size):
            batch = queries[start:start + args.batch_size]
            try:
                images = [load_image(path) for path in batch]
            except DataError as error:
                raise SystemExit(f"iadgpt inspect: {error}") from error
            _note_sizes(normals, images)
            for path, image, name, result in zip(batch, images, names[start:], inspector.inspect(
                    images, [normals] * len(images), [abnormal] * len(images))):
                label = "anomalous" if result.score >= args.threshold else "normal"
                flagged += label == "anomalous"
                heatmap_overlay(image, result.anomaly_map).save(out / "overlays" / name)
                writer.writerow([str(path), f"{result.score:.6f}", label, f"overlays/{name}"])
            stream.flush()
    source = f"product {args.product!r}" if args.product else f"{len(normals)} normal reference(s)"
    print(f"Inspected {len(queries)} image(s) against {source}: {flagged} anomalous at "
          f"threshold {args.threshold:g}. Wrote {out / 'scores.csv'} and {out / 'overlays'}/")
    return 0
