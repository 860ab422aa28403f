"""Stage builders on a small synthetic factory made by the test."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from iadgpt.data.factory import make_synthetic
from iadgpt.data.records import StageInfo, read_records
from iadgpt.data.samples import load_mask

REPO = Path(__file__).resolve().parents[2]


def build(stage: int, *args, check: bool = True) -> str:
    """Run a builder recipe in this process (as `python data_builders/stageN.py ...`); its error line or ''."""
    argv = sys.argv
    sys.argv = [f"stage{stage}.py", *map(str, args)]
    try:
        runpy.run_path(str(REPO / "data_builders" / f"stage{stage}.py"), run_name="__main__")
    except SystemExit as exit_:
        if check and exit_.code:
            raise AssertionError(exit_.code)
        return str(exit_.code)
    finally:
        sys.argv = argv
    return ""


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    out = tmp_path_factory.mktemp("factory") / "fac"
    make_synthetic(out, categories=3, seed=0, image_size=64, train_normals=6, test_normals=3,
                   test_anomalies_per_kind=1)
    return out


@pytest.fixture(scope="module")
def stages(factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    build(1, "--captions", f"fac={factory / 'captions.jsonl'}", "--out", root / "s1")
    build(2, "--dataset", f"fac=mvtec:{factory}", "--records", 24, "--replay", root / "s1", "--replay-ratio", 0.5,
          "--out", root / "s2", "--records-per-shard", 10)
    build(3, "--dataset", f"fac=mvtec:{factory}", "--records", 30, "--replay", root / "s2", "--replay-ratio", 0.8,
          "--out", root / "s3", "--records-per-shard", 10)
    return root


def test_every_stage_writes_valid_records_that_datasets_loads(stages):
    from datasets import load_dataset

    for stage, tasks in ((1, {"caption"}), (2, {"odd_one_out", "difference_regions", "irregular_region", "caption"}),
                         (3, {"detection", "localization", "reasoning", "odd_one_out", "difference_regions",
                              "irregular_region", "caption"})):
        folder = stages / f"s{stage}"
        info = StageInfo.read(folder)
        records = list(read_records(folder))
        assert info.complete and info.num_records == len(records)
        assert {r.task for r in records} == tasks
        for record in records:
            for path in record.images:
                assert info.image_path(record, path).is_file()
        loaded = load_dataset("json", data_files=[str(folder / s) for s in info.shards], split="train")
        assert len(loaded) == len(records)


def test_replay_shares_follow_the_ratios(stages):
    s1 = len(list(read_records(stages / "s1")))
    s2 = list(read_records(stages / "s2"))
    s3 = list(read_records(stages / "s3"))
    replayed_1 = sum(r.id.startswith("replay-s1") for r in s2)
    replayed_2 = sum(r.id.startswith("replay-") for r in s3)
    assert abs(replayed_1 / s1 - 0.5) < 0.15
    assert abs(replayed_2 / len(s2) - 0.8) < 0.15
    assert sum(not r.id.startswith("replay-") for r in s2) == 24


def test_stage3_prompts_are_the_inference_prompt_and_answers_lead_with_yes_or_no(stages, factory):
    from iadgpt.model.prompts import few_shot_messages
    from iadgpt.model.settings import DetectionQuestion

    question = DetectionQuestion().text
    detections = [r for r in read_records(stages / "s3") if r.task == "detection"]
    assert {r.meta["shots"] for r in detections} == {1, 2, 4}
    for record in detections:
        shots = record.image_roles.count("exemplar")
        assert record.messages[0] == few_shot_messages(shots, question)[0]
        answer = record.messages[1]["content"][0]["text"]
        assert answer.startswith("Yes" if record.label else "No")
        assert (record.mask is not None) == bool(record.label)
        assert record.image_roles[-1] == "query" and record.images[-1] not in record.images[:-1]


def test_difference_boxes_cover_the_synthetic_mask(stages):
    info = StageInfo.read(stages / "s2")
    found = 0
    for record in read_records(stages / "s2"):
        answer = record.messages[-1]["content"][0]["text"]
        if record.task != "difference_regions" or not answer.startswith("Yes"):
            continue
        boxes = json.loads(answer[len("Yes. "):])
        mask = load_mask(info.image_path(record, record.images[1].replace(".png", "_mask.png")), None)
        ys, xs = np.nonzero(mask)
        # the 64 px factory images resize to 56 px for the processor: boxes are in those pixels
        scale = 56 / 64
        x1 = min(b["bbox_2d"][0] for b in boxes)
        y2 = max(b["bbox_2d"][3] for b in boxes)
        assert abs(x1 - round(xs.min() * scale)) <= 1 and abs(y2 - (round((ys.max() + 1) * scale) - 1)) <= 1
        found += 1
    assert found


def test_builds_are_deterministic_and_resume_after_a_crash(factory, stages, tmp_path):
    args = ["--dataset", f"fac=mvtec:{factory}", "--records", 30, "--replay", stages / "s2", "--replay-ratio", 0.8,
            "--records-per-shard", 10]
    build(3, *args, "--out", tmp_path / "again")
    reference = {p.name: p.read_bytes() for p in (stages / "s3").glob("shard-*.jsonl")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("shard-*.jsonl")} == reference
    # A crash after two shards: the last shard and the completion mark are gone.
    shards = sorted((tmp_path / "again").glob("shard-*.jsonl"))
    for shard in shards[2:]:
        shard.unlink()
    info = json.loads((tmp_path / "again" / "info.json").read_text())
    info.update(complete=False, shards=[s.name for s in shards[:2]])
    (tmp_path / "again" / "info.json").write_text(json.dumps(info))
    first_mtime = shards[0].stat().st_mtime_ns
    build(3, *args, "--out", tmp_path / "again")
    assert shards[0].stat().st_mtime_ns == first_mtime  # finished shards are not rewritten
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("shard-*.jsonl")} == reference


def test_a_resumed_build_refuses_changed_arguments(factory, tmp_path):
    out = tmp_path / "s3"
    args = ["--dataset", f"fac=mvtec:{factory}", "--records", 10, "--records-per-shard", 4, "--out", out]
    build(3, *args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    error = build(3, *args, "--seed", 3, "--records-per-shard", 2, check=False)
    assert error == (f"stage3.py: {out} was built with other arguments (--records-per-shard 4 -> 2, --seed 0 -> 3); "
                     "re-run with the same arguments to resume it, or add --restart to rebuild it from scratch.")
    assert "(--records 10 -> 12)" in build(3, *args, "--records", 12, check=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing was written
    build(3, *args)  # the same arguments: a finished build stays as it is
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    build(3, *args, "--seed", 3, "--records-per-shard", 2, "--restart")
    ids = [record.id for record in read_records(out)]
    assert len(ids) == len(set(ids)) == StageInfo.read(out).num_records == 10
    assert StageInfo.read(out).config["seed"] == 3


def test_a_writer_resumes_only_shards_of_its_own_size(tmp_path):
    from iadgpt.data.records import ShardWriter, TrainingRecord
    from iadgpt.data.samples import DataError

    def records():
        for i in range(7):
            yield TrainingRecord(id=f"c{i}", task="caption", root="toy", images=[f"{i}.png"], image_roles=["other"],
                                 messages=[{"role": "user", "content": [{"type": "image"}]},
                                           {"role": "assistant", "content": "A part."}])

    writer = ShardWriter(tmp_path / "s", StageInfo(stage=1, roots={"toy": "/data"}), records_per_shard=5)
    writer.write(records())
    writer.close()  # shards of 5 and 2
    with pytest.raises(DataError, match=r"\(5 records in shard-00000.jsonl -> 4 per shard\); re-run with the same "
                                        "arguments to resume it, or add --restart"):
        ShardWriter(tmp_path / "s", StageInfo(stage=1, roots={"toy": "/data"}), records_per_shard=4)
    writer = ShardWriter(tmp_path / "s", StageInfo(stage=1, roots={"toy": "/data"}), records_per_shard=5)
    writer.write(records())
    assert writer.close().num_records == 7  # the finished build's short last shard counts as it is
    assert [r.id for r in read_records(tmp_path / "s")] == [f"c{i}" for i in range(7)]


def test_benchmark_test_split_never_leaks(factory, tmp_path):
    build(2, "--dataset", f"fac=mvtec:{factory}", "--records", 15, "--benchmark", f"mvtec:{factory}",
          "--out", tmp_path / "s2")
    info = StageInfo.read(tmp_path / "s2")
    for record in read_records(tmp_path / "s2"):
        for path in record.images:
            assert "/test/" not in str(info.image_path(record, path))
    error = build(3, "--dataset", f"fac=mvtec:{factory}", "--benchmark", f"mvtec:{factory}", "--out",
                  tmp_path / "s3", check=False)
    assert error.startswith("stage3.py: ") and "some anomalies with masks" in error


def test_bad_inputs_name_the_problem(factory, tmp_path):
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"image": "a.png", "caption": "ok"}\n{not json\n')
    assert f"{bad}:2: malformed JSON" in build(1, "--captions", f"x={bad}", "--out", tmp_path / "s1", check=False)
    assert "at least 10 normal images" in build(3, "--dataset", f"fac=mvtec:{factory}", "--shots", 9, "--out",
                                                tmp_path / "s3", check=False)
    assert "is not of the form [name=]kind:root" in build(2, "--dataset", f"mvtec{factory}", "--out",
                                                          tmp_path / "s2", check=False)


def test_stage1_captions_from_an_openai_compatible_endpoint(tmp_path):
    import http.server
    import threading

    from PIL import Image

    folder = tmp_path / "parts"
    (folder / "good").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 90)).save(folder / "good" / f"{i}.png")
    seen = []

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][0]["content"]
            assert self.path == "/v1/chat/completions" and content[1]["image_url"]["url"].startswith("data:image/png")
            seen.append(body["model"])
            reply = json.dumps({"choices": [{"message": {"content": f"A grey part number {len(seen)}."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        build(1, "--caption-endpoint", url, "--caption-model", "vlm", "--caption-images", folder, "--out", tmp_path / "s1")
        records = list(read_records(tmp_path / "s1"))
        assert len(records) == 3 and seen == ["vlm"] * 3
        assert {r.messages[1]["content"][0]["text"] for r in records} == {f"A grey part number {i}." for i in (1, 2, 3)}
        # captions already there are not asked for again
        build(1, "--caption-endpoint", url, "--caption-model", "vlm", "--caption-images", folder, "--out",
              tmp_path / "s1b")
        assert len(seen) == 3
    finally:
        server.shutdown()


def test_skip_bad_counts_what_it_leaves_out(factory, tmp_path, capsys):
    import shutil

    copy = tmp_path / "fac"
    shutil.copytree(factory, copy)
    category = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    mask = next((category / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    error = build(2, "--dataset", f"fac=mvtec:{copy}", "--records", 6, "--out", tmp_path / "strict", check=False)
    assert mask.name.replace("_mask", "") in error and "mask" in error
    build(2, "--dataset", f"fac=mvtec:{copy}", "--records", 6, "--skip-bad", "--out", tmp_path / "lenient")
    assert "fac: skipped 1 bad samples" in capsys.readouterr().out


def test_a_truncated_exemplar_is_named_at_build_time_and_skip_bad_counts_it(factory, tmp_path, capsys):
    import shutil

    copy = tmp_path / "fac"
    shutil.copytree(factory, copy)
    category = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    truncated = sorted((category / "train" / "good").glob("*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    error = build(3, "--dataset", f"fac=mvtec:{copy}", "--records", 20, "--out", tmp_path / "strict", check=False)
    assert error.startswith(f"stage3.py: {truncated.resolve()}: cannot decode image: corrupt or truncated image")
    assert error.endswith("(--skip-bad leaves such samples out)")
    assert not (tmp_path / "strict").exists()
    capsys.readouterr()
    build(3, "--dataset", f"fac=mvtec:{copy}", "--records", 20, "--skip-bad", "--out", tmp_path / "lenient")
    assert "fac: skipped 1 bad samples (1 unreadable image or mask)" in capsys.readouterr().out
    info = StageInfo.read(tmp_path / "lenient")
    used = {info.image_path(r, path).resolve() for r in read_records(tmp_path / "lenient") for path in r.images}
    assert truncated.resolve() not in used and len(used) > 20


def test_exactly_k_train_normals_draw_exemplars_from_the_whole_normal_pool(tmp_path):
    factory = tmp_path / "fac"
    make_synthetic(factory, categories=2, seed=0, image_size=64, train_normals=4, test_normals=3,
                   test_anomalies_per_kind=1)
    build(3, "--dataset", f"fac=mvtec:{factory}", "--records", 40, "--shots", 4, "--out", tmp_path / "s3")
    records = list(read_records(tmp_path / "s3"))
    assert len(records) == 40
    for record in records:
        exemplars = [path for path, role in zip(record.images, record.image_roles) if role == "exemplar"]
        query = record.images[record.image_roles.index("query")]
        assert len(set(exemplars)) == 4 and query not in exemplars
        assert all("/good/" in path for path in exemplars)
    # A train-normal query leaves 3 train normals: its exemplars include a test normal.
    train_queries = [r for r in records if "/train/" in r.images[-1]]
    assert train_queries
    assert all(any("/test/" in path for path in r.images[:4]) for r in train_queries)


def test_instruction_data_becomes_few_shot_where_the_category_is_known(factory, tmp_path):
    from PIL import Image

    anomaly = next(p for p in sorted(factory.rglob("test/*/*.png")) if p.parent.name != "good")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(factory.parent / "web.png")  # a web image: no category
    data = [
        {"id": "a", "image": str(anomaly.relative_to(factory.parent)),
         "conversations": [{"from": "human", "value": "<image>\nWhat is wrong here?"},
                           {"from": "gpt", "value": "A scratch near the edge."},
                           {"from": "human", "value": "How could it be avoided?"},
                           {"from": "gpt", "value": "Handle parts with care."}]},
        {"id": "b", "image": "web.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A dark tile."}]},
    ]
    instructions = factory.parent / "instruct.json"
    instructions.write_text(json.dumps(data))
    build(3, "--dataset", f"fac=mvtec:{factory}", "--records", 3, "--instructions", instructions,
          "--instruction-shots", 2, "--out", tmp_path / "s3")
    records = {r.meta.get("instruction_id"): r for r in read_records(tmp_path / "s3") if r.id.startswith("s3i")}
    few, zero = records["a"], records["b"]
    assert few.image_roles == ["exemplar", "exemplar", "query"] and few.root == "fac"
    assert few.category == anomaly.parts[-4] and few.images[-1] == anomaly.relative_to(factory).as_posix()
    assert [m["role"] for m in few.messages] == ["user", "assistant", "user", "assistant"]
    assert few.messages[0]["content"][-1]["text"] == "What is wrong here?"
    assert few.messages[3]["content"][0]["text"] == "Handle parts with care."
    assert zero.image_roles == ["query"] and zero.root == "instructions0" and zero.category is None
    info = StageInfo.read(tmp_path / "s3")
    for record in (few, zero):
        for path in record.images:
            assert info.image_path(record, path).is_file()


def test_stage3_synthesises_defective_queries_for_a_folder_of_normals_only(factory, tmp_path):
    """The own-parts path: a product folder with normal images only makes stage-3 records whose
    defective queries are synthetic defects on a normal that is not among the exemplars, with their
    mask (the pixel loss) and boxes around it (localization)."""
    import shutil

    from PIL import Image

    normals = sorted(next(factory.glob("c000_*")).glob("train/good/*.png"))
    assert len(normals) == 6
    parts = tmp_path / "parts" / "bracket" / "train" / "good"
    parts.mkdir(parents=True)
    for path in normals:
        shutil.copy(path, parts / path.name)
    error = build(3, "--dataset", f"mine=folder:{tmp_path / 'parts'}", "--out", tmp_path / "none", check=False)
    assert "some anomalies with masks (or --synthetic-fraction above 0" in error

    build(3, "--dataset", f"mine=folder:{tmp_path / 'parts'}", "--records", 40, "--synthetic-fraction", 0.5,
          "--out", tmp_path / "s3")
    info = StageInfo.read(tmp_path / "s3")
    records = list(read_records(tmp_path / "s3"))
    defective = [r for r in records if r.label]
    assert len(records) == 40 and 10 < len(defective) < 30
    assert {r.task for r in defective} == {"detection", "localization"}
    for record in records:
        for path in [*record.images, *([record.mask] if record.mask else [])]:
            assert info.image_path(record, path).is_file()
    for record in defective:  # all synthetic: the product has no real defect
        assert record.root == "stage" and record.images[-1].startswith("synthetic/")
        base = record.meta["synthetic_from"]
        assert base not in record.images[:-1]
        query = np.asarray(Image.open(info.image_path(record, record.images[-1])).convert("RGB")).astype(int)
        normal = np.asarray(Image.open(info.image_path(record, base)).convert("RGB")).astype(int)
        mask = load_mask(info.image_path(record, record.mask), None) > 0
        changed = np.abs(query - normal).sum(-1) > 0
        assert mask.any() and changed.any() and not (changed & ~mask).any()  # the defect is where its mask is
        answer = record.messages[-1]["content"][0]["text"]
        if record.task == "localization":
            from scipy import ndimage

            regions, _ = ndimage.label(mask, structure=np.ones((3, 3)))
            largest = ndimage.find_objects(regions)[int(np.bincount(regions.ravel())[1:].argmax())]
            scale = 56 / 64  # boxes are in the processor's resized pixels
            expected = [largest[1].start * scale, largest[0].start * scale, largest[1].stop * scale - 1,
                        largest[0].stop * scale - 1]
            boxes = [b["bbox_2d"] for b in json.loads(answer)]
            assert any(all(abs(a - e) <= 1 for a, e in zip(box, expected)) for box in boxes)  # it has a box
        else:
            assert answer.startswith("Yes, the query image has a ")
    # a dataset with real defects mixes real and synthetic defective queries at the fraction
    build(3, "--dataset", f"fac=mvtec:{factory}", "--records", 60, "--synthetic-fraction", 0.5,
          "--out", tmp_path / "mixed")
    mixed = [r for r in read_records(tmp_path / "mixed") if r.label]
    synthetic = sum("synthetic_from" in r.meta for r in mixed)
    assert 0 < synthetic < len(mixed)
