"""Helpers of the service tests: a real `iadgpt serve` process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint, products, port, *extra):
    """`iadgpt serve` in a child process, once /healthz answers (at most 30 s)."""
    import httpx

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "-m", "iadgpt.cli", "serve", "--model", str(checkpoint),
                                "--products", str(products), "--port", str(port), *map(str, extra)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(process.stderr.read().decode()[-2000:])
