"""`iadgpt serve`: the HTTP inspection service on one checkpoint and a products folder.

    iadgpt serve --model runs/stage3 --products products [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Binds 127.0.0.1 unless `--host` says otherwise. OpenAPI docs at /docs; see `iadgpt.serving.app` for
the endpoints and docs/evaluation.md for examples.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..model.checkpoint import DEVICE_HELP
from .app import ServeSettings


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="checkpoint folder every request is inspected with")
    parser.add_argument("--products", help="products folder (default: $IADGPT_PRODUCTS, else ./products)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="key every /v1 request must bear as 'Authorization: Bearer KEY' "
                                          "(default: $IADGPT_API_KEY; none: open)")
    defaults = ServeSettings(model="")
    for name, help_text in (("max_request_bytes", "largest request body (413 above)"),
                            ("max_image_pixels", "largest image, width x height (413 above)"),
                            ("max_queries", "most query images per request (413 above)"),
                            ("max_batch", "most queries in one forward pass across requests"),
                            ("max_wait_ms", "how long a query waits for others to share its forward pass"),
                            ("reference_cache_size", "reference sets kept encoded in memory")):
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"{help_text} (default {value})")
    parser.add_argument("--device", help=DEVICE_HELP)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..model.checkpoint import check_checkpoint
    from .app import create_app

    try:
        check_checkpoint(args.model)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"iadgpt serve: {error}") from None
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    settings = ServeSettings(**{k: v for k, v in vars(args).items() if k in fields})
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
