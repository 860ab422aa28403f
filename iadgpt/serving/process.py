"""`iadgpt serve` as a child process on 127.0.0.1, for the load benchmark and the tests that drive the
real service (restarts, SIGKILL, the browser)."""

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
    """`iadgpt serve` in a child process, returned once /healthz answers (at most 30 s); `extra`: more
    command-line options. Its stderr goes to a temporary file (a pipe nobody reads would fill and stall
    the server); a server that never answers raises with the file's last lines."""
    import tempfile
    import urllib.error
    import urllib.request

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "iadgpt.cli", "serve", "--model", str(checkpoint),
                                "--products", str(products), "--port", str(port), *map(str, extra)],
                               stdout=subprocess.DEVNULL, stderr=log, env=env)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    process.kill()
    process.wait()
    log.seek(0)
    raise RuntimeError(f"iadgpt serve did not answer on port {port}: {log.read().decode()[-2000:]}")
