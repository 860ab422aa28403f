"""`iadgpt product`: named reference sets for a line, and their calibrated thresholds.

    iadgpt product add bracket --model runs/stage3 --normals line3/good/ [--abnormal line3/known_bad/]
    iadgpt product calibrate bracket --normals line3/validation_good/ [--defects line3/validation_bad/] \\
        [--target-fpr 0.01]
    iadgpt product list | show bracket | remove bracket
    iadgpt inspect --product bracket --query incoming/ --out runs/inspect

The products folder is `--products DIR`, else $IADGPT_PRODUCTS, else ./products (`iadgpt.products`).
`calibrate` scores held-out normal images (never the references) with the product's model and sets
the threshold at the target false-alarm rate, or at F1-max when defective examples are given; it
stores the threshold with the measured false-alarm and miss rates, every score
(`calibration/scores.csv`) and a histogram (`calibration/histogram.png`).
"""

from __future__ import annotations

import argparse
import json

from .data.samples import DataError, load_image
from .model.checkpoint import DEVICE_HELP
from .products import ProductError, ProductStore, calibrate_product, require_enough_normals


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--products", help="products folder (default: $IADGPT_PRODUCTS, else ./products)")
        return sub

    add = action("add", "store a product: its normal (and abnormal) reference images and the model they serve")
    add.add_argument("name")
    add.add_argument("--model", required=True, help="the checkpoint folder the product is inspected with")
    add.add_argument("--normals", nargs="+", required=True, metavar="PATH", help="normal references: files, folders, globs")
    add.add_argument("--abnormal", nargs="*", default=[], metavar="PATH", help="optional defective examples")
    add.add_argument("--overwrite", action="store_true", help="replace a product of the same name")
    action("list", "the stored products, one line each")
    show = action("show", "a product's settings and calibration, as JSON")
    show.add_argument("name")
    remove = action("remove", "delete a product")
    remove.add_argument("name")
    cal = action("calibrate", "set a product's threshold from held-out images")
    cal.add_argument("name")
    cal.add_argument("--normals", nargs="+", required=True, metavar="PATH",
                     help="held-out normal images (not the references): files, folders, globs")
    cal.add_argument("--defects", nargs="*", default=[], metavar="PATH",
                     help="defective images: with them the threshold is the F1-max one")
    cal.add_argument("--target-fpr", type=float, default=0.01,
                     help="false-alarm rate the threshold allows on the normals (default 0.01)")
    cal.add_argument("--batch-size", type=int, default=4, help="queries per forward pass")
    cal.add_argument("--device", help=DEVICE_HELP)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        return ACTIONS[args.action](ProductStore(args.products), args)
    except (ProductError, DataError, FileNotFoundError) as error:
        raise SystemExit(f"iadgpt product {args.action}: {error}") from None


def _add(store: ProductStore, args) -> int:
    from .evaluation.inspect_cli import expand_image_paths
    from .model.checkpoint import check_checkpoint

    check_checkpoint(args.model)
    normals = expand_image_paths(args.normals, "--normals")
    abnormal = expand_image_paths(args.abnormal, "--abnormal") if args.abnormal else []
    product = store.add(args.name, args.model, normals, abnormal, overwrite=args.overwrite)
    print(f"Stored product {product.name!r} in {product.folder}: {len(product.normals)} normal and "
          f"{len(product.abnormal)} abnormal reference(s), for {product.model}. Not calibrated yet: "
          f"iadgpt product calibrate {product.name} --normals HELD_OUT_NORMALS")
    return 0


def _list(store: ProductStore, args) -> int:
    products = store.list()
    if not products:
        print(f"No products in {store.folder}.")
        return 0
    for product in products:
        threshold = "not calibrated" if product.calibration is None else \
            f"threshold {product.threshold:.4f} ({product.calibration.method})"
        print(f"{product.name}\t{len(product.normals)} normal, {len(product.abnormal)} abnormal\t{threshold}\t"
              f"{product.model}")
    return 0


def _show(store: ProductStore, args) -> int:
    product = store.get(args.name)
    print(json.dumps({"folder": str(product.folder), **product.to_json()}, indent=2))
    return 0


def _remove(store: ProductStore, args) -> int:
    store.remove(args.name)
    print(f"Removed product {args.name!r} from {store.folder}.")
    return 0


def _calibrate(store: ProductStore, args) -> int:
    from .evaluation.inspect_cli import expand_image_paths
    from .inspection import Inspector
    from .model.checkpoint import DeviceError, device_and_dtype

    product = store.get(args.name)
    normal_paths = expand_image_paths(args.normals, "--normals")
    defect_paths = expand_image_paths(args.defects, "--defects") if args.defects else []
    require_enough_normals(len(normal_paths), args.target_fpr, bool(defect_paths))  # before loading anything
    normals = {str(path): load_image(path) for path in normal_paths}
    defects = {str(path): load_image(path) for path in defect_paths}
    try:
        device, _ = device_and_dtype(args.device)
    except DeviceError as error:
        raise ProductError(f"--device: {error}") from error
    product.check_model(product.model)
    inspector = Inspector.from_pretrained(product.model, device=device, batch_size=args.batch_size)
    calibration = calibrate_product(store, product, inspector, normals, defects, args.target_fpr)
    miss = "" if calibration.miss_rate is None else \
        f", miss rate {calibration.miss_rate:.4f} on {len(defect_paths)} defects"
    print(f"Calibrated {product.name!r} ({calibration.method}): threshold {calibration.threshold:.6f}; false-alarm rate "
          f"{calibration.false_alarm_rate:.4f} on {len(normal_paths)} held-out normals{miss}. Scores and histogram "
          f"in {product.folder / 'calibration'}/")
    return 0


ACTIONS = {"add": _add, "list": _list, "show": _show, "remove": _remove, "calibrate": _calibrate}
