"""`iadgpt product` and `iadgpt inspect --product`: stored reference sets and calibrated thresholds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadgpt.cli import main
from iadgpt.products import (ProductError, ProductStore, threshold_at_f1_max, threshold_at_false_alarm_rate)


@pytest.fixture()
def line(tmp_path, random_image):
    """A product's images: 3 references, 6 held-out normals, 3 defective ones (random: only the
    bookkeeping is tested here, not the model's judgement)."""
    folders = {name: tmp_path / name for name in ("refs", "held_out", "bad", "incoming")}
    for name, count in (("refs", 3), ("held_out", 6), ("bad", 3), ("incoming", 4)):
        folders[name].mkdir()
        for i in range(count):
            random_image().save(folders[name] / f"{i}.png")
    return folders


def product(*argv):
    return main(["product", *map(str, argv)])


def test_add_calibrate_inspect_and_remove_a_product(tiny_checkpoint, line, tmp_path, capsys):
    products = tmp_path / "products"
    product("add", "bracket", "--model", tiny_checkpoint, "--normals", line["refs"], "--products", products)
    stored = ProductStore(products).get("bracket")
    assert len(stored.normals) == 3 and stored.calibration is None
    assert [np.asarray(i).tolist() for i in stored.normal_images()] == \
        [np.asarray(Image.open(line["refs"] / f"{i}.png").convert("RGB")).tolist() for i in range(3)]

    # at a target false-alarm rate: 6 normals allow 1 alarm at 0.2
    product("calibrate", "bracket", "--normals", line["held_out"], "--target-fpr", 0.2, "--products", products)
    calibrated = ProductStore(products).get("bracket").calibration
    scores = list(csv.DictReader((products / "bracket" / "calibration" / "scores.csv").open()))
    normal_scores = sorted(float(r["score"]) for r in scores if r["kind"] == "normal")
    assert len(normal_scores) == 6 and calibrated.method == "target_fpr"
    assert normal_scores[-2] - 1e-6 < calibrated.threshold <= normal_scores[-1] + 1e-6  # (the CSV rounds to 1e-6)
    assert calibrated.false_alarm_rate == pytest.approx(1 / 6)
    with Image.open(products / "bracket" / "calibration" / "histogram.png") as histogram:
        assert histogram.size == (480, 240)

    # inspect uses the product's references, model and threshold; scores.csv keeps the raw score
    main(["inspect", "--product", "bracket", "--products", str(products), "--query", str(line["incoming"]),
          "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 4
    for row in rows:
        assert row["label"] == ("anomalous" if float(row["score"]) >= calibrated.threshold else "normal")
    assert f"threshold {calibrated.threshold:g}" in capsys.readouterr().out
    # references of another size than a query: allowed, and said how they are resized
    (tmp_path / "small").mkdir()
    Image.new("RGB", (84, 84), "gray").save(tmp_path / "small" / "q.png")
    main(["inspect", "--product", "bracket", "--products", str(products), "--query", str(tmp_path / "small"),
          "--out", str(tmp_path / "out_small")])
    assert "note: a reference is 112x112 px and a query 84x84 px; each image is resized on its own" in \
        capsys.readouterr().err

    # with defects: the F1-max threshold, and the miss rate
    product("calibrate", "bracket", "--normals", line["held_out"], "--defects", line["bad"], "--products", products)
    f1 = ProductStore(products).get("bracket").calibration
    assert f1.method == "f1_max" and f1.defects == 3 and f1.miss_rate is not None

    product("list", "--products", products)
    assert "bracket\t3 normal, 0 abnormal\tthreshold" in capsys.readouterr().out
    product("remove", "bracket", "--products", products)
    assert ProductStore(products).names() == [] and [p.name for p in products.iterdir()] == [".lock"]


def test_thresholds_by_hand():
    normals = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    # at most floor(0.2 * 5) = 1 alarm: just above the second largest score
    threshold = threshold_at_false_alarm_rate(normals, 0.2)
    assert 0.4 < threshold < 0.4 + 1e-9 and (normals >= threshold).sum() == 1
    assert (normals >= threshold_at_false_alarm_rate(normals, 0.1)).sum() == 0
    # F1 at each candidate: t=0.5 calls the two defects (0.5, 0.8) and the 0.9 normal: F1 = 2*2/(3+2) = 0.8;
    # t=0.8 calls 0.8 and 0.9: 2*1/(2+2) = 0.5; t=0.35 calls 0.4, 0.5, 0.8, 0.9: 2*2/(4+2) = 0.67
    assert threshold_at_f1_max(normals, np.array([0.5, 0.8])) == 0.5


@pytest.mark.parametrize("argv, message", [
    (["add", "a/b", "--normals", "{refs}"], r"product name 'a/b': use letters"),
    (["add", ".hidden", "--normals", "{refs}"], r"product name '.hidden'"),
    (["calibrate", "nothing", "--normals", "{held_out}"], r"no product 'nothing' in .* \(products there: none\)"),
])
def test_bad_names_are_refused(tiny_checkpoint, line, tmp_path, argv, message):
    argv = [a.format(**line) for a in argv]
    if argv[0] == "add":
        argv += ["--model", str(tiny_checkpoint)]
    with pytest.raises(SystemExit, match=message):
        product(*argv, "--products", tmp_path / "products")


def test_what_calibration_and_inspection_refuse(tiny_checkpoint, line, tmp_path):
    from iadgpt.model import init_model

    products = tmp_path / "products"
    product("add", "bracket", "--model", tiny_checkpoint, "--normals", line["refs"], "--products", products)
    with pytest.raises(SystemExit, match="product 'bracket' already exists .* pass --overwrite"):
        product("add", "bracket", "--model", tiny_checkpoint, "--normals", line["refs"], "--products", products)
    with pytest.raises(SystemExit, match=r"6 held-out normal image\(s\) cannot show a false-alarm rate of 0.01: it "
                                         r"takes at least 100"):
        product("calibrate", "bracket", "--normals", line["held_out"], "--products", products)
    with pytest.raises(SystemExit, match=r"3 calibration image\(s\) are the product's own references"):
        product("calibrate", "bracket", "--normals", line["held_out"], line["refs"], "--target-fpr", 0.2,
                "--products", products)
    other = init_model(tmp_path / "other", "tiny", seed=1)
    with pytest.raises(SystemExit, match=f"product 'bracket' was made with the weights of .*; {other} holds other"):
        main(["inspect", "--product", "bracket", "--products", str(products), "--model", str(other),
              "--query", str(line["incoming"]), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--normals with --product"):
        main(["inspect", "--product", "bracket", "--products", str(products), "--normals", str(line["refs"]),
              "--query", str(line["incoming"]), "--out", str(tmp_path / "out")])
    manifest = products / "bracket" / "product.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 2}))
    with pytest.raises(SystemExit, match="written in product format 2; this iadgpt reads format 1"):
        product("show", "bracket", "--products", products)


def test_a_product_appears_whole_or_not_at_all(tiny_checkpoint, line, tmp_path, monkeypatch):
    """A failure while the images are copied (a corrupt file, a full disk) leaves no product and no
    visible leftovers; a failed overwrite leaves the old product as it was."""
    products = tmp_path / "products"
    (line["refs"] / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png: cannot decode"):
        product("add", "bracket", "--model", tiny_checkpoint, "--normals", line["refs"], "--products", products)
    assert ProductStore(products).names() == [] and [p.name for p in products.iterdir()] == [".lock"]
    (line["refs"] / "broken.png").unlink()
    product("add", "bracket", "--model", tiny_checkpoint, "--normals", line["refs"], "--products", products)
    before = (products / "bracket" / "product.json").read_text()

    saved = []
    original = Image.Image.save

    def failing_save(self, *args, **kwargs):
        saved.append(1)
        if len(saved) == 2:
            raise OSError("No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ProductStore(products).add("bracket", tiny_checkpoint, sorted(line["held_out"].iterdir()), overwrite=True)
    assert (products / "bracket" / "product.json").read_text() == before
    assert sorted(p.name for p in products.iterdir()) == [".lock", "bracket"]
    with pytest.raises(ProductError, match="at least one normal"):
        ProductStore(products).add("empty", tiny_checkpoint, [])


def test_leftovers_of_killed_writes_are_undone_but_not_those_of_a_running_writer(tiny_checkpoint, line, tmp_path,
                                                                                 monkeypatch):
    """What a writer killed at each step leaves: a half-assembled product, a product moved aside by an
    unfinished replacement (its new version never renamed in), a half-deleted product, a
    half-written calibration and product.json. `recover` puts the moved-aside product back and
    deletes the rest; while another process holds the write lock it touches nothing."""
    import fcntl
    import shutil

    products = tmp_path / "products"
    store = ProductStore(products)
    for name in ("bracket", "hinge", "gear"):
        store.add(name, tiny_checkpoint, sorted(line["refs"].iterdir()))
    hinge_manifest = (products / "hinge" / "product.json").read_text()
    # killed while assembling "clip": a staging folder with some images and no product.json
    shutil.copytree(products / "bracket", products / ".clip.new-a1b2c3")
    (products / ".clip.new-a1b2c3" / "product.json").unlink()
    # killed between the two renames that replace "hinge": the old one aside, the new one staged
    (products / ".hinge.old-x_y").mkdir()
    (products / "hinge").rename(products / ".hinge.old-x_y" / "hinge")
    shutil.copytree(products / "bracket", products / ".hinge.new-zz9")
    # killed while deleting "bolt": moved aside, not yet deleted
    (products / ".bolt.removed-q").mkdir()
    shutil.copytree(products / "bracket", products / ".bolt.removed-q" / "bolt")
    # killed while calibrating "gear": its staging folder and a half-written product.json
    (products / "gear" / ".calibration.new-k").mkdir()
    (products / "gear" / ".calibration.new-k" / "scores.csv").write_text("path,kind,score\n")
    (products / "gear" / ".product.json.new").write_text('{"format": 1, "na')
    # someone else's hidden file is not ours to delete
    (products / ".notes").write_text("keep")

    with open(products / ".lock", "a") as lock:  # another process writing: nothing is touched
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert ProductStore(products).recover() == []
        assert (products / ".clip.new-a1b2c3").is_dir() and not (products / "hinge").exists()

    done = ProductStore(products).recover()
    assert f"restored {products / 'hinge'}" in done and len(done) == 7
    assert sorted(p.name for p in products.iterdir()) == [".lock", ".notes", "bracket", "gear", "hinge"]
    assert sorted(p.name for p in (products / "gear").iterdir()) == ["normals", "product.json"]
    assert (products / "hinge" / "product.json").read_text() == hinge_manifest
    assert ProductStore(products).names() == ["bracket", "gear", "hinge"]
    assert ProductStore(products).recover() == []
    # a store this process may only read (opening the lock fails): served as it is, nothing touched
    (products / ".clip.new-ro").mkdir()

    def read_only(path, *args, **kwargs):
        if Path(path).name == ".lock":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr("iadgpt.products.open", read_only, raising=False)
    assert ProductStore(products).recover() == [] and (products / ".clip.new-ro").is_dir()
    monkeypatch.undo()
    # a write clears leftovers first, under the lock
    (products / ".clip.new-again").mkdir()
    store.remove("gear")
    assert sorted(p.name for p in products.iterdir()) == [".lock", ".notes", "bracket", "hinge"]
