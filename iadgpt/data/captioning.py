"""Captions for stage 1 from any OpenAI-compatible vision endpoint (off unless asked for).

The paper captioned its images with a commercial LVLM. This asks `<url>/chat/completions` (vLLM,
an Ollama or LM Studio server, a hosted API, ...) to describe each image from the perspectives
stage 1 teaches, and appends {"image", "caption"} lines to a captions.jsonl, skipping images
that already have a caption there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from .samples import DataError, load_image

CAPTION_PROMPT = (
    "You are an industrial quality inspector. Describe this product image in 2-3 sentences: overall "
    "shape, material, structural details and surface quality. Mention any visible defect."
)


def image_data_url(path: Path, max_side: int = 768) -> str:
    image = load_image(path)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_caption(url: str, model: str, path: Path, api_key: str | None = None, prompt: str = CAPTION_PROMPT,
                    timeout: float = 60.0) -> str:
    body = {"model": model, "temperature": 0.2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_data_url(path)}}]}]}
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"].strip()
    except (OSError, KeyError, IndexError, json.JSONDecodeError) as err:
        raise DataError(f"captioning {path} through {url} failed: {err}") from err


def caption_folder(images: Iterable[Path], root: Path, captions_file: Path, url: str, model: str,
                   api_key_env: str = "OPENAI_API_KEY") -> int:
    """Caption every image not yet in `captions_file` (paths relative to `root`); returns how many."""
    done = set()
    if captions_file.is_file():
        done = {json.loads(line)["image"] for line in captions_file.read_text().splitlines() if line.strip()}
    added = 0
    with captions_file.open("a") as handle:
        for path in images:
            relative = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
            if relative in done:
                continue
            caption = request_caption(url, model, Path(path), os.environ.get(api_key_env))
            handle.write(json.dumps({"image": relative, "caption": caption}) + "\n")
            handle.flush()
            added += 1
    return added
