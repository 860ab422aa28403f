"""`iadgpt serve` through its HTTP interface (FastAPI's TestClient) on the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from iadgpt.serving import ServeSettings, create_app


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


@pytest.fixture()
def client_for(tiny_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    clients = []

    def make(**overrides):
        settings = ServeSettings(model=str(tiny_checkpoint), products=str(tmp_path / "products"), max_queries=4,
                                 **overrides)
        client = TestClient(create_app(settings))
        client.app_state_products = settings.products
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_products_inspection_calibration_and_metrics(client_for, random_image, tiny_checkpoint):
    from iadgpt.inspection import Inspector

    client = client_for()
    assert client.get("/healthz").json()["status"] == "ok"
    references = [random_image() for _ in range(3)]
    created = client.post("/v1/products", data={"name": "bracket"},
                          files=[("normals", (f"{i}.png", png(r), "image/png")) for i, r in enumerate(references)])
    assert created.status_code == 201 and len(created.json()["normals"]) == 3
    assert [p["name"] for p in client.get("/v1/products").json()["products"]] == ["bracket"]

    queries = [random_image(), random_image(112, 84)]
    answer = client.post("/v1/inspect", json={"product": "bracket", "images": [b64(q) for q in queries]})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    direct = Inspector.from_pretrained(tiny_checkpoint).inspect(queries, [references] * 2)
    for query, result, expected in zip(queries, results, direct):
        assert abs(result["score"] - expected.score) < 1e-5 and result["threshold"] == 0.5
        assert result["label"] == ("defective" if expected.score >= 0.5 else "normal")
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
        assert heatmap.size == query.size
        assert np.abs(np.asarray(heatmap) / 255 - expected.anomaly_map).max() <= 0.5 / 255 + 1e-6
    # the same by multipart upload, and with inline references instead of a product
    upload = client.post("/v1/inspect", data={"product": "bracket"},
                         files=[("images", ("q.png", png(queries[0]), "image/png"))])
    assert abs(upload.json()["results"][0]["score"] - direct[0].score) < 1e-5
    inline = client.post("/v1/inspect", json={"normals": [b64(r) for r in references], "images": [b64(queries[0])],
                                              "threshold": 0.0})
    assert inline.json()["results"][0]["label"] == "defective" and inline.json()["product"] is None

    held_out = [random_image() for _ in range(5)]
    calibrated = client.post("/v1/products/bracket/calibrate", data={"target_fpr": "0.2"},
                             files=[("normals", (f"{i}.png", png(h), "image/png")) for i, h in enumerate(held_out)])
    assert calibrated.status_code == 200, calibrated.text
    threshold = calibrated.json()["threshold"]
    again = client.post("/v1/inspect", json={"product": "bracket", "images": [b64(queries[0])]}).json()
    assert again["threshold"] == threshold and again["results"][0]["label"] == \
        ("defective" if again["results"][0]["score"] >= threshold else "normal")

    for made_up in ("/v1/nothing-1", "/v1/nothing-2", "/products/bracket"):
        assert client.get(made_up).status_code == 404
    metrics = client.get("/metrics").text
    assert 'iadgpt_requests_total{endpoint="/v1/inspect",status="200"} 4.0' in metrics
    assert 'iadgpt_requests_total{endpoint="(no route)",status="404"} 3.0' in metrics and "nothing-1" not in metrics
    assert "iadgpt_batch_size_count" in metrics and "iadgpt_reference_cache_hits_total" in metrics
    assert client.delete("/v1/products/bracket").json() == {"removed": "bracket"}
    assert client.get("/v1/products/bracket").status_code == 404


def test_every_refusal_has_its_status_and_names_the_problem(client_for, random_image):
    client = client_for(max_image_pixels=200 * 200, max_request_bytes=2_000_000)
    image = b64(random_image())
    cases = [
        ({"product": "nothing", "images": [image]}, 404, "no product 'nothing'"),
        ({"normals": [image], "images": ["not base64!"]}, 422, "images[0]: not valid base64"),
        ({"normals": [image], "images": [base64.b64encode(b"no image").decode()]}, 422,
         "images[0]: not a decodable image"),
        ({"normals": [image], "images": [image] * 5}, 413, "5 query images is over the limit of 4"),
        ({"normals": [image], "images": [b64(Image.new("RGB", (300, 300)))]}, 413,
         "images[0]: 300x300 px is over the limit of 40000 pixels"),
        ({"normals": [image]}, 422, "no query image"),
    ]
    for body, status, message in cases:
        answer = client.post("/v1/inspect", json=body)
        assert answer.status_code == status and message in answer.json()["error"]["message"], (body.keys(), answer.text)
    big = client.post("/v1/inspect", content=b"x" * 2_100_000, headers={"content-type": "application/json"})
    assert big.status_code == 413 and "max_request_bytes" in big.json()["error"]["message"]
    made = {"name": "bracket"}, [("normals", ("a.png", png(random_image()), "image/png"))]
    assert client.post("/v1/products", data=made[0], files=made[1]).status_code == 201
    duplicate = client.post("/v1/products", data=made[0], files=made[1])
    assert duplicate.status_code == 409 and "pass --overwrite" in duplicate.json()["error"]["message"]
    bad_name = client.post("/v1/products", data={"name": "../etc"}, files=made[1])
    assert bad_name.status_code == 422 and "no path separators" in bad_name.json()["error"]["message"]
    both = client.post("/v1/inspect", json={"product": "bracket", "normals": [image], "images": [image]})
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]


def test_an_api_key_guards_every_v1_endpoint(client_for, random_image):
    client = client_for(api_key="s3cret")
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/products").status_code == 401
    assert client.get("/v1/products", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/products", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_concurrent_requests_share_a_forward_pass(client_for, random_image):
    client = client_for(max_wait_ms=300.0, max_batch=8)
    references = b64(random_image())
    bodies = [{"normals": [references], "images": [b64(random_image())]} for _ in range(4)]
    answers = [None] * 4

    def ask(i):
        answers[i] = client.post("/v1/inspect", json=bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a.status_code == 200 for a in answers)
    metrics = client.get("/metrics").text
    batches = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("iadgpt_batch_size_count")))
    assert batches < 4  # fewer forward passes than requests


def data_url(image) -> str:
    return "data:image/png;base64," + b64(image)


def test_openai_compatible_chat_answers_as_the_dialogue_does_and_streams(client_for, random_image, tiny_checkpoint):
    import json

    from iadgpt.dialogue import Dialogue, reply
    from iadgpt.inspection import Inspector

    client = client_for()
    normal, query = random_image(), random_image()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(normal)}},
                                             {"type": "image_url", "image_url": {"url": data_url(query)}},
                                             {"type": "text", "text": "Is there a defect?"}]},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Where is it?"}]
    answer = client.post("/v1/chat/completions", json={"model": "iadgpt", "messages": messages, "max_tokens": 6})
    assert answer.status_code == 200, answer.text
    text = answer.json()["choices"][0]["message"]["content"]
    inspector = Inspector.from_pretrained(tiny_checkpoint)
    dialogue = Dialogue(query, [normal])
    dialogue.turns = [("Is there a defect?", "Yes.")]
    assert text == reply(inspector.model, inspector.processor, [dialogue], ["Where is it?"], max_new_tokens=6)[0]

    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 6, "stream": True}) as events:
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == text


def test_the_openai_client_library_talks_to_the_chat_endpoint(client_for, random_image, tiny_checkpoint):
    """The official `openai` package, pointed at the service: its key as the service's API key, a
    product named in `extra_body`, a plain and a streamed completion, a wrong key refused as such."""
    import openai

    from iadgpt.products import ProductStore

    client = client_for(api_key="line-3-key")
    normal, query = random_image(), random_image()
    ProductStore(client.app_state_products).add("bracket", tiny_checkpoint, [("normal", normal)])
    question = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(query)}},
                                             {"type": "text", "text": "Is there a defect?"}]}]
    plain = client.post("/v1/chat/completions", headers={"Authorization": "Bearer line-3-key"},
                        json={"messages": question, "product": "bracket", "max_tokens": 6}).json()
    expected = plain["choices"][0]["message"]["content"]

    library = openai.OpenAI(base_url="http://testserver/v1", api_key="line-3-key", http_client=client, max_retries=0)
    completion = library.chat.completions.create(model="iadgpt", messages=question, max_tokens=6,
                                                 extra_body={"product": "bracket"})
    assert completion.choices[0].message.content == expected and completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.role == "assistant" and completion.model == "iadgpt"
    stream = library.chat.completions.create(model="iadgpt", messages=question, max_tokens=6, stream=True,
                                             extra_body={"product": "bracket"})
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip() == expected
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="guess", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        wrong.chat.completions.create(model="iadgpt", messages=question, extra_body={"product": "bracket"})


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "Is there a defect?"}], "no image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}],
     "images must be data URLs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMAGE"}}]},
      {"role": "assistant", "content": "Yes."}], "the last message must be the user's question"),
    ([], "a non-empty list"),
])
def test_chat_refuses_malformed_conversations(client_for, random_image, messages, message):
    client = client_for()
    for m in messages:
        if isinstance(m["content"], list):
            for part in m["content"]:
                if part["image_url"]["url"] == "IMAGE":
                    part["image_url"]["url"] = data_url(random_image())
    answer = client.post("/v1/chat/completions", json={"messages": messages})
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]


def test_a_product_of_other_weights_is_refused_and_the_docs_are_served(client_for, random_image, tmp_path):
    from iadgpt.model import init_model
    from iadgpt.products import ProductStore

    client = client_for()
    other = init_model(tmp_path / "other", "tiny", seed=1)
    reference = tmp_path / "ref.png"
    random_image().save(reference)
    ProductStore(tmp_path / "products").add("elsewhere", other, [reference])
    answer = client.post("/v1/inspect", json={"product": "elsewhere", "images": [b64(random_image())]})
    assert answer.status_code == 409 and "made with other weights" in answer.json()["error"]["message"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/inspect", "/v1/products", "/v1/products/{name}", "/v1/products/{name}/calibrate",
            "/v1/chat/completions", "/healthz", "/metrics", "/ui"} <= set(paths)
    assert "iadgpt inspection demo" in client.get("/ui").text
