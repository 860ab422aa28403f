"""Small stage folders made by the tests: captions, odd-one-out groups and few-shot detection."""

from __future__ import annotations

import numpy as np
from PIL import Image

from iadgpt.data.records import ShardWriter, StageInfo, TrainingRecord
from iadgpt.model.prompts import few_shot_messages
from iadgpt.model.settings import DetectionQuestion


def write_stage(folder, images_root, num_records: int = 16, shots: int = 2, seed: int = 0):
    """Products are flat colours; a defect is a bright square (with its mask)."""
    rng = np.random.default_rng(seed)
    images_root.mkdir(parents=True, exist_ok=True)
    question = DetectionQuestion().text

    def save(name, array):
        Image.fromarray(array).save(images_root / name)
        return name

    records = []
    for i in range(num_records):
        colour = rng.integers(40, 200, 3)
        base = np.ones((56, 56, 3), np.uint8) * colour.astype(np.uint8)
        exemplars = [save(f"r{i}_n{k}.png", np.clip(base + rng.integers(-5, 5, base.shape), 0, 255).astype(np.uint8))
                     for k in range(shots)]
        defective = i % 2 == 1
        query = base.copy()
        mask_name = None
        if defective:
            y, x = rng.integers(4, 36, 2)
            query[y:y + 16, x:x + 16] = 255
            mask = np.zeros((56, 56), np.uint8)
            mask[y:y + 16, x:x + 16] = 255
            mask_name = save(f"r{i}_mask.png", mask)
        query_name = save(f"r{i}_q.png", query)
        records.append(TrainingRecord(
            id=f"r{i}", task="detection", root="toy", images=[*exemplars, query_name],
            image_roles=["exemplar"] * shots + ["query"],
            messages=few_shot_messages(shots, question, answer="Yes" if defective else "No"),
            mask=mask_name, label=int(defective), category=f"c{i % 3}", source="toy"))
    writer = ShardWriter(folder, StageInfo(stage=3, roots={"toy": str(images_root)}), records_per_shard=5)
    writer.write(records)
    return writer.close()




def write_caption_stage(folder, images_root, num_records: int = 8, seed: int = 1):
    """Stage 1: one image and its description. Stage 2 (odd one out) reuses the same images."""
    rng = np.random.default_rng(seed)
    images_root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_records):
        colour = ("red", "green", "blue")[i % 3]
        array = np.zeros((56, 56, 3), np.uint8)
        array[..., i % 3] = 200 + rng.integers(0, 40)
        Image.fromarray(array).save(images_root / f"cap{i}.png")
        records.append(TrainingRecord(
            id=f"cap{i}", task="caption", root="toy", images=[f"cap{i}.png"], image_roles=["other"],
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the product."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": f"A flat {colour} plastic tile."}]}],
            source="toy"))
    writer = ShardWriter(folder, StageInfo(stage=1, roots={"toy": str(images_root)}))
    writer.write(records)
    return writer.close()


def write_odd_one_out_stage(folder, images_root, num_records: int = 8):
    records = []
    for i in range(num_records):
        names = [f"cap{(i + k) % 8}.png" for k in range(3)]
        content = [{"type": "text", "text": "Which image is different from the others?"}]
        content += [{"type": "image"} for _ in names]
        records.append(TrainingRecord(
            id=f"odd{i}", task="odd_one_out", root="toy", images=names, image_roles=["other"] * 3,
            messages=[{"role": "user", "content": content},
                      {"role": "assistant", "content": [{"type": "text", "text": f"Image {1 + i % 3}."}]}],
            source="toy"))
    writer = ShardWriter(folder, StageInfo(stage=2, roots={"toy": str(images_root)}))
    writer.write(records)
    return writer.close()
