"""The HTTP inspection service (`iadgpt serve`): FastAPI on one loaded checkpoint and a products folder.

    POST   /v1/inspect                   query images (JSON base64 or multipart) against a product or inline references
    GET    /v1/products                  the stored products;  GET /v1/products/NAME  one of them
    POST   /v1/products                  create one from uploaded reference images (multipart)
    DELETE /v1/products/NAME
    POST   /v1/products/NAME/calibrate   set its threshold from uploaded held-out images (multipart)
    POST   /v1/chat/completions          OpenAI-compatible chat about a query image (streams with stream=true)
    GET    /healthz, GET /metrics (Prometheus text), GET /docs (OpenAPI)
    GET    /ui                           the web demo: pick or create a product, inspect a part, chat about it

The products are the same files `iadgpt product` writes (`iadgpt.products`). Queries that arrive
within `max_wait_ms` of each other share one forward pass (`MicroBatcher`): the inspector groups them
by reference set and runs each group on that set's cached prefix. One worker thread runs the model,
so requests never run it concurrently. A client never names a path on the server: images travel in
the request. With an API key (`--api-key` or $IADGPT_API_KEY) every /v1 request needs
`Authorization: Bearer KEY`, compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image, UnidentifiedImageError

API_KEY_ENVIRONMENT = "IADGPT_API_KEY"


@dataclass
class ServeSettings:
    """What `iadgpt serve` runs with (every field is a command-line option of the same name)."""

    model: str
    """The checkpoint folder every request is inspected with."""
    products: str | None = None
    """The products folder (default: $IADGPT_PRODUCTS, else ./products)."""
    host: str = "127.0.0.1"
    """Address to bind: the local machine only unless told otherwise."""
    port: int = 8000
    api_key: str | None = None
    """Key every /v1 request must bear (default: $IADGPT_API_KEY; none: open)."""
    max_request_bytes: int = 32 * 1024 * 1024
    """Largest request body; larger ones get 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width x height); larger ones get 413."""
    max_queries: int = 16
    """Most query images per request; more get 413."""
    max_batch: int = 8
    """Most queries in one forward pass across requests."""
    max_wait_ms: float = 10.0
    """How long the first waiting query waits for others to share its forward pass. Long enough for a
    burst of concurrent requests to be read and decoded (about 1 ms each on a CPU core) before the
    batch leaves; shorter waits send half-full batches."""
    reference_cache_size: int = 8
    """Reference sets whose encoded prefix stays in memory."""
    device: str | None = None


class RequestError(Exception):
    """A request the service refuses: HTTP status and a message naming what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error"}
"""OpenAI's error types by status (other refusals: "invalid_request_error"), so that OpenAI client
libraries raise their matching exception with the message."""


def error_response(status: int, message: str) -> JSONResponse:
    """A refusal in OpenAI's error shape, on every endpoint: {"error": {"message", "type", "code"}}."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB, or a RequestError naming it (422 undecodable, 413 too many pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise RequestError(413, f"{what}: {image.width}x{image.height} px is over the limit of "
                                        f"{max_pixels} pixels (max_image_pixels)")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(422, f"{what}: not a decodable image ({error})") from None


def decode_base64_image(text: str, what: str, max_pixels: int) -> Image.Image:
    if not isinstance(text, str):
        raise RequestError(422, f"{what}: expected a base64 string")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise RequestError(422, f"{what}: not valid base64") from None
    return decode_image(data, what, max_pixels)


def png_base64(array: np.ndarray) -> str:
    """A [H, W] map in [0, 1] as a grey 8-bit PNG, base64."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object, or a RequestError (422) saying what it is instead."""
    import json

    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as error:
        raise RequestError(422, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(422, "the body must be a JSON object")
    return body


def parse_json_inspection(raw: bytes, max_pixels: int, max_queries: int):
    """(body, query images, normals, abnormal) of a JSON /v1/inspect request, or a RequestError."""
    body = json_object(raw)
    count = len(body.get("images") or [])
    if count > max_queries:  # before decoding any of them
        raise RequestError(413, f"{count} query images is over the limit of {max_queries} per request (max_queries)")
    decoded = {kind: [decode_base64_image(text, f"{kind}[{i}]", max_pixels) for i, text in
                      enumerate(body.get(kind) or [])] for kind in ("images", "normals", "abnormal")}
    return body, decoded["images"], decoded["normals"], decoded["abnormal"]


@dataclass
class _Waiting:
    query: Image.Image
    normals: list
    abnormal: list
    with_text: bool
    future: asyncio.Future = field(default=None)


class MicroBatcher:
    """Queries of concurrent requests gathered into one `Inspector.inspect` call: the first waiting
    query waits at most `max_wait` seconds for others, a batch holds at most `max_batch`. The model
    runs on one worker thread."""

    def __init__(self, inspector, max_batch: int, max_wait: float, on_batch=None):
        self.inspector, self.max_batch, self.max_wait, self.on_batch = inspector, max_batch, max_wait, on_batch
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iadgpt-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    async def inspect(self, queries, normals, abnormal, with_text: bool = False) -> list:
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(q, normals, abnormal, with_text, loop.create_future()) for q in queries]
        for item in waiting:
            self.queue.put_nowait(item)
        return await asyncio.gather(*(item.future for item in waiting))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            for with_text in (False, True):  # text is asked per request: run the two kinds apart
                part = [item for item in batch if item.with_text == with_text]
                if part:
                    await self._inspect(loop, part, with_text)

    async def _inspect(self, loop, part: list[_Waiting], with_text: bool) -> None:
        try:
            results = await loop.run_in_executor(self.worker, lambda: self.inspector.inspect(
                [i.query for i in part], [i.normals for i in part], [i.abnormal for i in part], with_text=with_text))
        except Exception as error:  # every waiting request learns of it; the service goes on
            for item in part:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if self.on_batch is not None:
            self.on_batch(len(part))
        for item, result in zip(part, results):
            if not item.future.done():
                item.future.set_result(result)


def create_app(settings: ServeSettings, inspector=None):
    """The FastAPI application; `inspector` (an `Inspector`) is loaded from `settings.model` if not given."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from ..products import (ProductError, ProductExists, ProductNotFound, ProductStore, calibrate_product,
                            checkpoint_digest)

    api_key = settings.api_key or os.environ.get(API_KEY_ENVIRONMENT) or None
    store = ProductStore(settings.products)
    registry = CollectorRegistry()
    requests_total = Counter("iadgpt_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("iadgpt_request_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    batch_sizes = Histogram("iadgpt_batch_size", "Queries per forward pass", registry=registry,
                            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
    cache_hits = Counter("iadgpt_reference_cache_hits", "Reference sets served from the cache", registry=registry)
    cache_misses = Counter("iadgpt_reference_cache_misses", "Reference sets encoded", registry=registry)
    store_lock = threading.Lock()  # product writes one at a time (each is atomic on disk anyway)
    state: dict = {}

    def model_digest() -> str:
        if "digest" not in state:
            state["digest"] = checkpoint_digest(settings.model)
        return state["digest"]

    def on_batch(size: int) -> None:
        batch_sizes.observe(size)
        hits, misses = state["inspector"].reference_cache_hits, state["inspector"].reference_cache_misses
        cache_hits.inc(hits - state.get("hits", 0))
        cache_misses.inc(misses - state.get("misses", 0))
        state["hits"], state["misses"] = hits, misses

    async def lifespan(app):
        nonlocal inspector
        for action in store.recover():  # leftovers of a killed write, before any request sees the store
            logging.getLogger("iadgpt.serve").warning("products: %s", action)
        if inspector is None:
            from ..inspection import Inspector

            inspector = Inspector.from_pretrained(settings.model, device=settings.device, batch_size=settings.max_batch,
                                                  reference_cache_size=settings.reference_cache_size)
        state["inspector"] = inspector
        state["batcher"] = MicroBatcher(inspector, settings.max_batch, settings.max_wait_ms / 1000, on_batch)
        state["batcher"].start()
        yield
        await state["batcher"].stop()

    app = FastAPI(title="iadgpt inspection service", version="1", lifespan=lifespan,
                  description="Few-shot industrial inspection with an IADGPT checkpoint.")

    class Guard:
        """Key, size limit and metrics around every HTTP request, as plain ASGI middleware (Starlette's
        `BaseHTTPMiddleware` runs each request in an extra task: more work per request than the
        micro-batched model spends per query)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                if scope["path"].startswith("/v1"):
                    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                               if k in (b"authorization", b"content-length")}
                    if api_key is not None:
                        given = headers.get("authorization", "")
                        token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
                        if not hmac.compare_digest(token.encode(), api_key.encode()):
                            raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)")
                    length = headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
                        raise RequestError(413, f"request body of {length} bytes is over the limit of "
                                                f"{settings.max_request_bytes} (max_request_bytes)")
                await self.app(scope, receive, send_status)
            except RequestError as error:
                await error_response(error.status, error.message)(scope, receive, send_status)
            finally:
                # the route's template, not the URL: a client making up paths must not make up time series
                name = getattr(scope.get("route"), "path", "(no route)")
                requests_total.labels(name, str(status[0])).inc()
                latency.labels(name).observe(time.perf_counter() - start)

    app.add_middleware(Guard)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return error_response(error.status, error.message)

    @app.exception_handler(ProductError)
    async def product_error(request: Request, error: ProductError):
        status = 404 if isinstance(error, ProductNotFound) else 409 if isinstance(error, ProductExists) else 422
        return error_response(status, str(error))

    async def body_bytes(request: Request) -> bytes:
        """The body, refused once it grows past the limit (a chunked upload has no length header)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_request_bytes:
                raise RequestError(413, f"request body over the limit of {settings.max_request_bytes} bytes "
                                        "(max_request_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_form(request: Request) -> dict[str, list]:
        """A multipart form as {field: [values]}, uploaded files as (filename, bytes)."""
        from starlette.datastructures import UploadFile

        form = await request.form(max_files=settings.max_queries * 8, max_fields=64)
        fields: dict[str, list] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = (value.filename or key, await value.read())
            fields.setdefault(key, []).append(value)
        return fields

    def product_for_request(name: str):
        product = store.get(name)
        if product.model_digest != model_digest():
            raise RequestError(409, f"product {name!r} was made with other weights ({product.model}) than this "
                                    f"service's model ({settings.model}): re-create it for this model")
        return product

    def product_images(product) -> tuple[list, list]:
        """The product's reference images, decoded once per version of its product.json."""
        version = (product.folder / "product.json").stat().st_mtime_ns
        cached = state.setdefault("images", {}).get(product.name)
        if cached is None or cached[0] != version:
            cached = (version, product.normal_images(), product.abnormal_images())
            state["images"][product.name] = cached
        return cached[1], cached[2]

    @app.get("/ui")
    async def demo():
        from fastapi.responses import HTMLResponse

        return HTMLResponse((Path(__file__).parent / "static" / "demo.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": settings.model, "products": len(store.names())}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/inspect")
    async def inspect(request: Request):
        """Query images against a product (`product`) or inline references (`normals`, `abnormal`).

        JSON: `{"images": [base64, ...], "product": NAME | "normals": [base64, ...], "abnormal": [...],
        "threshold": t, "with_text": false}`; or multipart with files `images` (and `normals`,
        `abnormal`) and fields `product`, `threshold`, `with_text`. The label uses the product's
        calibrated threshold, else `threshold`, else 0.5. Each result: score, label, threshold, the
        heatmap (grey PNG, base64, at the query's size) and, when asked, the text answer.
        """
        limit = settings.max_image_pixels
        loop = asyncio.get_running_loop()
        # Decoding and encoding images is each request's own work: it runs on threads (PIL releases the
        # GIL), so the event loop stays free to gather other requests into the model's next batch.
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await read_form(request)

            def decoded(kind: str) -> list:
                return [decode_image(data, f"{kind}[{i}] ({name})", limit) for i, (name, data) in
                        enumerate(form.get(kind, []))]

            images, normals, abnormal = await loop.run_in_executor(
                None, lambda: (decoded("images"), decoded("normals"), decoded("abnormal")))
            product_name = (form.get("product") or [None])[0]
            threshold = (form.get("threshold") or [None])[0]
            with_text = (form.get("with_text") or ["false"])[0].lower() in ("1", "true", "yes")
        else:
            raw = await body_bytes(request)
            body, images, normals, abnormal = await loop.run_in_executor(None, parse_json_inspection, raw, limit,
                                                                         settings.max_queries)
            product_name, threshold = body.get("product"), body.get("threshold")
            with_text = bool(body.get("with_text", False))
        if len(images) > settings.max_queries:
            raise RequestError(413, f"{len(images)} query images is over the limit of {settings.max_queries} per "
                                    "request (max_queries)")
        if not images:
            raise RequestError(422, "no query image: send one or more in `images`")
        product = None
        if product_name:
            if normals or abnormal:
                raise RequestError(422, "give a product or inline references (normals), not both")
            product = product_for_request(str(product_name))
            normals, abnormal = product_images(product)
        try:
            threshold = product.threshold if product is not None and product.threshold is not None else \
                float(threshold if threshold is not None else 0.5)
        except (TypeError, ValueError):
            raise RequestError(422, f"threshold {threshold!r} is not a number") from None
        results = await state["batcher"].inspect(images, normals, abnormal, with_text)
        heatmaps = await loop.run_in_executor(None, lambda: [png_base64(r.anomaly_map) for r in results])
        return {"product": product.name if product else None, "threshold": threshold, "results": [
            {"score": r.score, "label": "defective" if r.score >= threshold else "normal", "threshold": threshold,
             "width": image.width, "height": image.height, "heatmap_png": heatmap, "text": r.text}
            for image, r, heatmap in zip(images, results, heatmaps)]}

    def summary(product) -> dict:
        data = product.to_json()
        return {key: data[key] for key in ("name", "model", "normals", "abnormal", "question", "created",
                                           "calibration")}

    @app.get("/v1/products")
    async def list_products():
        return {"products": [summary(p) for p in store.list()]}

    @app.get("/v1/products/{name}")
    async def get_product(name: str):
        return summary(store.get(name))

    @app.post("/v1/products", status_code=201)
    async def create_product(request: Request):
        """Multipart: field `name`, files `normals` (and `abnormal`), field `overwrite` ("true")."""
        form = await read_form(request)
        name = (form.get("name") or [""])[0]
        limit = settings.max_image_pixels
        normals = [(filename, decode_image(data, f"normals[{i}] ({filename})", limit))
                   for i, (filename, data) in enumerate(form.get("normals", []))]
        abnormal = [(filename, decode_image(data, f"abnormal[{i}] ({filename})", limit))
                    for i, (filename, data) in enumerate(form.get("abnormal", []))]
        overwrite = (form.get("overwrite") or ["false"])[0].lower() in ("1", "true", "yes")

        def add():
            with store_lock:
                return store.add(name, settings.model, normals, abnormal, overwrite=overwrite)

        product = await asyncio.get_running_loop().run_in_executor(None, add)
        return summary(product)

    @app.delete("/v1/products/{name}")
    async def delete_product(name: str):
        with store_lock:
            store.remove(name)
        return {"removed": name}

    @app.post("/v1/products/{name}/calibrate")
    async def calibrate(name: str, request: Request):
        """Multipart: files `normals` (held out, not the references) and optionally `defects`; field
        `target_fpr` (default 0.01)."""
        product = product_for_request(name)
        form = await read_form(request)
        limit = settings.max_image_pixels
        normals = {f"{i}:{n}": decode_image(d, f"normals[{i}] ({n})", limit)
                   for i, (n, d) in enumerate(form.get("normals", []))}
        defects = {f"{i}:{n}": decode_image(d, f"defects[{i}] ({n})", limit)
                   for i, (n, d) in enumerate(form.get("defects", []))}
        try:
            target_fpr = float((form.get("target_fpr") or [0.01])[0])
        except ValueError:
            raise RequestError(422, "target_fpr is not a number") from None

        def run():
            with store_lock:
                return calibrate_product(store, product, state["inspector"], normals, defects, target_fpr)

        calibration = await asyncio.get_running_loop().run_in_executor(state["batcher"].worker, run)
        return {"name": name, "calibration": summary(store.get(name))["calibration"],
                "threshold": calibration.threshold}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI-compatible. Images come as `image_url` data URLs in the user messages: the last image is
        the query, the earlier ones its normal references, or the references are a product's when the
        request names one in the extra field `product`. Earlier user / assistant turns are the history;
        the answer is greedy (`max_tokens`, default 256); `stream: true` sends server-sent events."""
        import json
        import uuid

        from fastapi.responses import StreamingResponse

        from ..dialogue import reply

        body = json_object(await body_bytes(request))
        dialogue, question = conversation_from_messages(body.get("messages"), settings.max_image_pixels,
                                                        settings.max_queries)
        if body.get("product"):
            if dialogue.normals:
                raise RequestError(422, "give a product or reference images, not both")
            product = product_for_request(str(body["product"]))
            dialogue.normals, dialogue.abnormal = product_images(product)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        inspector, worker = state["inspector"], state["batcher"].worker
        loop = asyncio.get_running_loop()
        ident, created, model_name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or "iadgpt"

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                            "finish_reason": finish}]}) + "\n\n"

        if not body.get("stream"):
            [answer] = await loop.run_in_executor(worker, lambda: reply(
                inspector.model, inspector.processor, [dialogue], [question], max_new_tokens=max_tokens))
            return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}]}

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(inspector.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        done = loop.run_in_executor(worker, lambda: reply(inspector.model, inspector.processor, [dialogue],
                                                          [question], max_new_tokens=max_tokens, streamer=streamer))

        async def events():
            yield chunk({"role": "assistant"})
            pieces = iter(streamer)
            while True:
                piece = await loop.run_in_executor(None, next, pieces, None)
                if piece is None:
                    break
                if piece:
                    yield chunk({"content": piece})
            await done
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def conversation_from_messages(messages, max_pixels: int, max_images: int):
    """(Dialogue, last question) from OpenAI chat messages: the images (data URLs) of the user messages
    in order, the last the query; text turns alternate user / assistant, and the last is the user's."""
    from ..dialogue import Dialogue

    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "messages: a non-empty list of chat messages is required")
    images, turns = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(422, f"messages[{index}]: expected a role of system, user or assistant")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        texts = []
        for part_index, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url" and message["role"] == "user":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:"):
                    raise RequestError(422, f"messages[{index}].content[{part_index}]: images must be data URLs "
                                            "(data:image/png;base64,...); the service fetches nothing")
                images.append(decode_base64_image(url, f"messages[{index}].content[{part_index}]", max_pixels))
            else:
                raise RequestError(422, f"messages[{index}].content[{part_index}]: unsupported part {kind!r}")
        if message["role"] != "system":
            turns.append((message["role"], " ".join(t for t in texts if t)))
    if not images:
        raise RequestError(422, "messages: no image; the last image of the user messages is the query")
    if len(images) > max_images + 1:
        raise RequestError(413, f"{len(images)} images is over the limit of {max_images + 1} (max_queries + 1)")
    if not turns or turns[-1][0] != "user":
        raise RequestError(422, "messages: the last message must be the user's question")
    users = [text for role, text in turns if role == "user"]
    assistants = [text for role, text in turns if role == "assistant"]
    if len(assistants) != len(users) - 1:
        raise RequestError(422, "messages: user and assistant turns must alternate, starting and ending with the user")
    dialogue = Dialogue(images[-1], images[:-1])
    dialogue.turns = list(zip(users[:-1], assistants))
    return dialogue, users[-1]
