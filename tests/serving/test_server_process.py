"""`iadgpt serve` as a process on 127.0.0.1: products and thresholds survive a restart, and a server
killed (SIGKILL) while it writes a product leaves that product whole or absent."""

from __future__ import annotations

import io
import json
import signal
import time

import pytest

from iadgpt.serving.process import free_port, start

pytestmark = pytest.mark.slow


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_restart_keeps_products_and_a_killed_write_leaves_no_half_product(tiny_checkpoint, tmp_path, random_image):
    import httpx

    products, port = tmp_path / "products", free_port()
    server = start(tiny_checkpoint, products, port)
    url = f"http://127.0.0.1:{port}"
    try:
        files = [("normals", (f"{i}.png", png(random_image()), "image/png")) for i in range(2)]
        assert httpx.post(f"{url}/v1/products", data={"name": "bracket"}, files=files, timeout=60).status_code == 201
        held_out = [("normals", (f"{i}.png", png(random_image()), "image/png")) for i in range(5)]
        threshold = httpx.post(f"{url}/v1/products/bracket/calibrate", data={"target_fpr": "0.2"}, files=held_out,
                               timeout=60).json()["threshold"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    server = start(tiny_checkpoint, products, port)
    try:
        [stored] = httpx.get(f"{url}/v1/products").json()["products"]
        assert stored["name"] == "bracket" and stored["calibration"]["threshold"] == threshold
        # a big product upload, the server killed while it handles it, at several moments
        many = [("normals", (f"{i}.png", png(random_image(256)), "image/png")) for i in range(40)]
        for delay in (0.05, 0.2, 0.5):
            def upload():
                try:
                    httpx.post(f"{url}/v1/products", data={"name": "big", "overwrite": "true"}, files=many, timeout=30)
                except httpx.HTTPError:
                    pass

            import threading

            thread = threading.Thread(target=upload)
            thread.start()
            time.sleep(delay)
            server.kill()  # SIGKILL
            server.wait(timeout=30)
            thread.join()
            for folder in products.iterdir():
                if folder.name.startswith("."):
                    continue  # the lock, or an unfinished staging folder: never a product
                manifest = json.loads((folder / "product.json").read_text())
                assert all((folder / path).is_file() for path in manifest["normals"])
            server = start(tiny_checkpoint, products, port)
            # the restarted service cleared what the killed write left (its staging folder)
            assert [p.name for p in products.iterdir() if p.name.startswith(".")] == [".lock"]
            names = [p["name"] for p in httpx.get(f"{url}/v1/products").json()["products"]]
            assert "bracket" in names and set(names) <= {"bracket", "big"}
    finally:
        server.kill()
        server.wait(timeout=30)
