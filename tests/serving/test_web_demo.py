"""The web demo at /ui in a real headless Chromium (Debian's `chromium`, driven by Playwright):
create a product by uploading normal images (and see a refusal's message), inspect a part, read the score from the page, move the
threshold, ask a question, and keep a screenshot."""

from __future__ import annotations

import shutil

import httpx
import pytest

from iadgpt.serving.process import free_port, start

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_demo_in_a_browser(tiny_checkpoint, tmp_path, random_image):
    import os

    if not shutil.which("chromium") and not os.environ.get("IADGPT_REQUIRE_BROWSER"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    normals = []
    for i in range(2):
        normals.append(tmp_path / f"normal{i}.png")
        random_image().save(normals[-1])
    query = tmp_path / "query.png"
    random_image(112, 140).save(query)
    port = free_port()
    server = start(tiny_checkpoint, tmp_path / "products", port)
    url = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"{url}/ui")
            page.click("summary")
            page.fill("#new-name", "bracket")
            page.set_input_files("#new-normals", [str(p) for p in normals])
            page.click("#create")
            page.wait_for_selector("#product option[value=bracket]", state="attached")
            page.click("#create")  # the same name again: the service's refusal is shown, message and all
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert page.text_content("#error").startswith("product 'bracket' already exists")
            page.set_input_files("#query", str(query))
            page.click("#inspect")
            page.wait_for_selector("#result:not([hidden])")
            shown = float(page.text_content("#score"))
            answer = httpx.post(f"{url}/v1/inspect", data={"product": "bracket"},
                                files=[("images", ("q.png", query.read_bytes(), "image/png"))], timeout=60).json()
            assert abs(shown - answer["results"][0]["score"]) < 1e-4
            for value, label in (("0", "defective"), ("1", "normal")):
                page.eval_on_selector("#threshold", f"(e) => {{ e.value = '{value}'; e.dispatchEvent(new Event('input')); }}")
                assert page.text_content("#label") == label
            assert page.eval_on_selector("#overlay", "(c) => [c.width, c.height]") == [140, 112]
            page.fill("#question", "Is there a defect?")
            page.click("#ask")
            page.wait_for_selector("#chatlog .answer")
            assert page.text_content("#chatlog .answer").startswith("iadgpt: ")
            assert page.text_content("#error") == ""
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
        assert (tmp_path / "demo.png").stat().st_size > 10_000
    finally:
        server.kill()
        server.wait(timeout=30)
