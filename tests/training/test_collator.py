"""Batches built through the checkpoint's processor: labels, roles, masks, lengths, dummy images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from toy_stages import write_caption_stage

from iadgpt.data.records import StageInfo, read_records
from iadgpt.training.collator import RecordCollator, record_length
from iadgpt.training.config import TrainConfig
from iadgpt.training.trainer import load_stage_data


def rows(folder):
    return [json.loads(r.to_json()) for r in read_records(folder)]


def test_labels_cover_only_the_assistant_answers(tiny_processor, toy_stage):
    collator = RecordCollator(tiny_processor, StageInfo.read(toy_stage))
    records = rows(toy_stage)[:4]
    batch = collator(records)
    tok = tiny_processor.tokenizer
    for b, record in enumerate(records):
        labelled = batch["labels"][b][batch["labels"][b] != -100]
        answer = record["messages"][-1]["content"][0]["text"]
        assert tok.decode(labelled) == answer + "<|im_end|>"
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>"))
    # right padding, padding never labelled
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_roles_and_query_masks(tiny_processor, toy_stage):
    collator = RecordCollator(tiny_processor, StageInfo.read(toy_stage))
    records = rows(toy_stage)[:2]  # r0 normal, r1 defective (2 exemplars + query each)
    batch = collator(records)
    assert batch["image_roles"].tolist() == [0, 0, 1, 0, 0, 1]
    normal_mask, defect_mask = batch["pixel_masks"]
    assert normal_mask.shape == (56, 56) and normal_mask.sum() == 0
    assert defect_mask.sum() == 16 * 16  # the 16 x 16 square of the toy defect
    no_normals = RecordCollator(tiny_processor, StageInfo.read(toy_stage), pixel_loss_on_normals=False)
    assert no_normals(records)["pixel_masks"][0] is None


def test_record_length_matches_the_processor_and_overlong_records_are_reported(tiny_processor, toy_stage, capsys):
    info = StageInfo.read(toy_stage)
    record = next(read_records(toy_stage))
    batch = RecordCollator(tiny_processor, info)([json.loads(record.to_json())])
    assert record_length(tiny_processor, record, info) == batch["input_ids"].shape[1]
    cfg = TrainConfig(data=str(toy_stage), max_length=batch["input_ids"].shape[1] - 1)
    with pytest.raises(ValueError, match="no record fits max_length"):
        load_stage_data(cfg, tiny_processor, main_process=True)
    cfg = TrainConfig(data=str(toy_stage), max_length=10_000)
    _, dataset, report = load_stage_data(cfg, tiny_processor, main_process=True)
    assert len(dataset) == 16 and report["too_long"] == []


def test_missing_image_is_named_before_training(tiny_processor, toy_stage, tmp_path):
    info = StageInfo.read(toy_stage)
    (__import__("pathlib").Path(info.roots["toy"]) / "r3_q.png").unlink()
    with pytest.raises(ValueError, match=r"record r3 references .*r3_q.png, which does not exist"):
        load_stage_data(TrainConfig(data=str(toy_stage)), tiny_processor, main_process=True)


def test_text_only_batch_gets_a_dummy_image(tiny_processor, tmp_path):
    write_caption_stage(tmp_path / "s1", tmp_path / "img")
    record = rows(tmp_path / "s1")[0]
    record["messages"][0]["content"] = [{"type": "text", "text": "What is a scratch?"}]
    record["images"], record["image_roles"] = [], []
    batch = RecordCollator(tiny_processor, StageInfo.read(tmp_path / "s1"))([record])
    assert "pixel_values" not in batch and batch["dummy_pixel_values"].shape[0] > 0
    assert np.array_equal(batch["dummy_image_grid_thw"].numpy(), [[1, 4, 4]])  # the smallest image allowed


def test_model_state_estimate_follows_the_zero_stage():
    from iadgpt.training.trainer import model_state_gib

    model = torch.nn.Linear(1000, 1000, bias=False)  # 1e6 trainable parameters
    gib = 1024 ** 3
    plain = model_state_gib(model, processes=2, zero_stage=None)  # fp32 weights, with or without autocast
    assert plain == pytest.approx({"weights": 4e6 / gib, "gradients": 4e6 / gib, "optimizer": 8e6 / gib})
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    zero2 = model_state_gib(model, processes=8, zero_stage=2)
    assert zero2 == pytest.approx({"weights": 2e6 / gib, "gradients": 2e6 / 8 / gib, "optimizer": 12e6 / 8 / gib})
    zero3 = model_state_gib(model, processes=8, zero_stage=3)
    assert zero3["weights"] == pytest.approx(2e6 / 8 / gib)
