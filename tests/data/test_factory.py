"""The synthetic factory: byte-identical reruns, MVTec-AD layout, captions, category independence,
and the in-context-only defects (normal-looking on their own, defective against their category).

Datasets are made at 64 px with a few images per kind, so each takes well under a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from iadgpt.data import MVTecReader
from iadgpt.data.factory import (
    IN_CONTEXT_KINDS,
    LOCAL_KINDS,
    OBJECT_FAMILIES,
    PALETTE,
    PATTERN_CHOICES,
    add_arguments,
    category_spec,
    main,
    make_image,
    make_synthetic,
    run,
)
from iadgpt.data.synthesis import foreground_mask

SEED = 5
SMALL = dict(image_size=64, train_normals=3, test_normals=2, test_anomalies_per_kind=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("factory") / "synthetic"
    make_synthetic(out, categories=4, seed=SEED, **SMALL)
    return out


def _nearest_palette(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = np.linalg.norm(np.array([PALETTE[n] for n in names], dtype=float) - rgb, axis=1)
    return names[int(np.argmin(distances))]


# ---------------------------------------------------------------------------------------------- determinism


def test_two_runs_are_byte_identical_whatever_the_worker_count(dataset: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path / "again", categories=4, seed=SEED, workers=2, **SMALL)
    first, second = _files(dataset), _files(tmp_path / "again")
    assert len(first) > 100
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_a_different_seed_makes_different_products(dataset: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path / "other", categories=4, seed=SEED + 1, **SMALL)
    first, second = _files(dataset), _files(tmp_path / "other")
    shared = [name for name in first if name.endswith(".png") and name in second]
    assert sum(first[name] != second[name] for name in shared) >= 0.9 * len(shared)


def test_a_category_does_not_depend_on_how_many_categories_are_made(dataset: Path, tmp_path: Path) -> None:
    make_synthetic(tmp_path / "six", categories=6, seed=SEED, **SMALL)
    make_synthetic(tmp_path / "alone", categories=[3], seed=SEED, **SMALL)
    name = category_spec(SEED, 3).name
    reference = _files(dataset / name)
    assert reference and reference == _files(tmp_path / "six" / name) == _files(tmp_path / "alone" / name)
    def described(root: Path) -> dict:
        return next(c for c in json.loads((root / "factory.json").read_text())["categories"] if c["index"] == 3)

    assert described(dataset) == described(tmp_path / "six")


# ---------------------------------------------------------------------------------------------- layout


def test_mvtec_layout_masks_for_every_anomaly_and_none_for_normals(dataset: Path) -> None:
    manifest = json.loads((dataset / "factory.json").read_text())
    assert len(manifest["categories"]) == 4
    for category in manifest["categories"]:
        root = dataset / category["name"]
        kinds = category["defect_kinds"]["local"] + category["defect_kinds"]["in_context"]
        assert set(category["defect_kinds"]["local"]) == set(LOCAL_KINDS)
        assert "wrong_color" in category["defect_kinds"]["in_context"]
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(kinds + ["good"])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(kinds), "normals have no masks"
        for kind in kinds:
            images = sorted((root / "test" / kind).glob("*.png"))
            assert len(images) == 2
            for image_path in images:
                mask_path = root / "ground_truth" / kind / f"{image_path.stem}_mask.png"
                image, mask = Image.open(image_path), Image.open(mask_path)
                assert image.mode == "RGB" and image.size == (64, 64)
                assert mask.size == image.size
                values = np.asarray(mask)
                assert set(np.unique(values)) <= {0, 255} and (values == 255).any()


def test_the_dataset_reader_of_the_project_reads_it(dataset: Path) -> None:
    samples = list(MVTecReader(dataset).samples())
    records = _jsonl(dataset / "images.jsonl")
    assert len(samples) == len(records)
    anomalous = [s for s in samples if s.is_anomalous]
    assert anomalous and all(s.mask_path is not None and s.mask_path.is_file() for s in anomalous)
    assert all(s.mask_path is None for s in samples if not s.is_anomalous)


def test_captions_cover_every_image_and_describe_look_and_defect(dataset: Path) -> None:
    captions = _jsonl(dataset / "captions.jsonl")
    records = {r["image"]: r for r in _jsonl(dataset / "images.jsonl")}
    images = {str(p.relative_to(dataset)) for p in dataset.rglob("*.png") if "ground_truth" not in p.parts}
    assert [set(c) for c in captions] == [{"image", "caption"}] * len(captions)
    assert sorted(c["image"] for c in captions) == sorted(images) == sorted(records)
    specs = {c["name"]: c for c in json.loads((dataset / "factory.json").read_text())["categories"]}
    for line in captions:
        record, spec = records[line["image"]], specs[records[line["image"]]["category"]]
        text = line["caption"]
        assert record["attributes"]["color"] in text and spec["material"] in text and spec["surface"] in text
        if record["defect"] == "good":
            assert record["mask"] is None and "No defects" in text
        else:
            assert record["mask"] and "Defect:" in text
            expected = "in_context" if record["defect"] in IN_CONTEXT_KINDS else "local"
            assert record["defect_class"] == expected


def test_kinds_can_be_restricted(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "few", categories=2, seed=SEED, kinds=["scratch", "wrong_color"], **SMALL)
    for category in json.loads((tmp_path / "few" / "factory.json").read_text())["categories"]:
        assert category["defect_kinds"] == {"local": ["scratch"], "in_context": ["wrong_color"]}
        assert sorted(p.name for p in (tmp_path / "few" / category["name"] / "test").iterdir()) == [
            "good", "scratch", "wrong_color"]


def test_a_folder_holding_another_run_is_refused_unless_overwrite(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_synthetic(out, categories=2, seed=SEED, **SMALL)
    make_synthetic(out, categories=2, seed=SEED, **SMALL)  # same parameters: a harmless re-run
    with pytest.raises(ValueError, match="different parameters"):
        make_synthetic(out, categories=2, seed=SEED + 1, **SMALL)
    old_names = {c["name"] for c in json.loads((out / "factory.json").read_text())["categories"]}
    make_synthetic(out, categories=1, seed=SEED + 1, overwrite=True, **SMALL)
    new_names = {c["name"] for c in json.loads((out / "factory.json").read_text())["categories"]}
    assert old_names != new_names
    assert {p.name for p in out.iterdir() if p.is_dir()} == new_names, "the old run's categories were removed"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic(tmp_path / "foreign", categories=1, seed=SEED, **SMALL)


# ---------------------------------------------------------------------------------------------- defects


@pytest.mark.parametrize("index", range(9))  # one category of each family for this seed
def test_every_mask_is_where_the_image_differs_from_its_defect_free_twin(index: int) -> None:
    spec = category_spec(SEED, index)
    for kind in spec.local_kinds + spec.in_context_kinds:
        for draw in range(2):
            made = make_image(spec, kind, np.random.default_rng([index, draw]), 64)
            changed = np.any(made.image != made.reference, axis=2)
            assert made.mask.sum() >= 6, f"{spec.name} {kind}: invisible defect"
            assert not changed[~made.mask].any(), f"{spec.name} {kind}: change outside the mask"
            if spec.is_texture and kind in IN_CONTEXT_KINDS:
                assert made.mask.all() and changed.mean() > 0.3, "the whole surface is the changed object"
            else:
                assert np.array_equal(changed, made.mask), f"{spec.name} {kind}: mask is not the changed pixels"


def _object_indices(families: tuple[str, ...], how_many: int) -> list[int]:
    return [i for i in range(60) if category_spec(SEED, i).family in families][:how_many]


@pytest.fixture(scope="module")
def object_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("objects") / "synthetic"
    indices = _object_indices(OBJECT_FAMILIES, 8)
    make_synthetic(out, categories=indices, seed=SEED, image_size=64, train_normals=3, test_normals=3,
                   test_anomalies_per_kind=3, kinds=["wrong_color", "wrong_count"])
    return out


def test_wrong_color_is_another_categorys_normal_colour_and_not_this_ones(object_dataset: Path) -> None:
    others = {category_spec(SEED, j).color: j for j in range(200)}
    records = _jsonl(object_dataset / "images.jsonl")
    checked = 0
    for category in json.loads((object_dataset / "factory.json").read_text())["categories"]:
        own = category["color"]
        normals = [r for r in records if r["category"] == category["name"] and r["defect"] == "good"]
        for record in normals:  # normal images show the category's own colour
            pixels = np.asarray(Image.open(object_dataset / record["image"]))
            assert _nearest_palette(np.median(pixels[foreground_mask(pixels)], axis=0)) == own
        for record in (r for r in records if r["category"] == category["name"] and r["defect"] == "wrong_color"):
            pixels = np.asarray(Image.open(object_dataset / record["image"]))
            mask = np.asarray(Image.open(object_dataset / record["mask"])) > 0
            seen = _nearest_palette(np.median(pixels[mask], axis=0))
            assert seen == record["attributes"]["color"] != own
            assert seen in category["allowed_colors"]  # still contrasts with the tray: looks normal alone
            donor = others.get(seen)
            assert donor is not None and donor != category["index"], f"{seen} is no other category's colour"
            checked += 1
    assert checked >= 8 * 3


def test_wrong_count_changes_the_number_of_items_to_a_count_normal_elsewhere(object_dataset: Path) -> None:
    records = _jsonl(object_dataset / "images.jsonl")
    counts_elsewhere = {category_spec(SEED, j).count for j in range(200)} - {None}
    categories = json.loads((object_dataset / "factory.json").read_text())["categories"]
    items = [c for c in categories if c["family"] == "items"]
    assert items, "the fixture must hold an items category"
    for category in items:
        for record in (r for r in records if r["category"] == category["name"]):
            if record["defect"] not in ("good", "wrong_count"):
                continue
            pixels = np.asarray(Image.open(object_dataset / record["image"]))
            _, blobs = ndimage.label(foreground_mask(pixels))
            if record["defect"] == "good":
                assert blobs == category["count"]
            else:
                assert blobs == record["attributes"]["count"] != category["count"]
                assert blobs in counts_elsewhere


def test_wrong_pattern_uses_another_shared_pattern() -> None:
    index = next(i for i in range(30) if category_spec(SEED, i).family in PATTERN_CHOICES)
    spec = category_spec(SEED, index)
    made = make_image(spec, "wrong_pattern", np.random.default_rng(0), 64)
    assert made.attributes["pattern"] in PATTERN_CHOICES[spec.family]
    assert made.attributes["pattern"] != spec.pattern
    assert np.abs(made.image.astype(int) - made.reference.astype(int)).mean() > 5


def test_shared_palette_every_colour_is_normal_somewhere() -> None:
    used = {category_spec(SEED, j).color for j in range(200)}
    assert used == set(PALETTE)


# ---------------------------------------------------------------------------------------------- command line


def test_command_line_entry_points(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "cli"), "--categories", "1", "--seed", "2", "--image-size", "48",
                 "--train-normals", "2", "--test-normals", "1", "--test-anomalies-per-kind", "1"]) == 0
    assert "images" in capsys.readouterr().out
    assert (tmp_path / "cli" / "factory.json").is_file()
    parser = argparse.ArgumentParser()
    args = add_arguments(parser).parse_args([str(tmp_path / "cli2"), "--categories", "1", "--kinds", "hole",
                                             "--train-normals", "1", "--test-normals", "0"])
    result = run(args)
    assert result.images == 1 + 4  # one training normal, no test normal, 4 (the default) holes
