"""How much the in-context residuals alone tell: AUROC of the raw residual distances, no language model.

For a checkpoint (default: a fresh random `small` model), draws held-out synthetic categories, k
normal references and normal / local-defect / in-context-only queries, encodes them with the
model's vision tower, and scores each query by the largest residual distance over its tokens
(`iadgpt.model.residuals`: token-level, and patch-level max over each token's patches), the map by
those distances. This is the signal the language model receives from `residuals.tokens`; the
trained model's AUROC can be compared against it (docs/experiments/2026-12-01-quickstart-experiments.md section 10).
`--shifted-exemplars` adds the exemplars' half-patch-shifted patches to the patch bank (the setting
`residuals.shifted_exemplars`); the nearest-patch baseline is scored on the same images. Each
category gets 6 normal, one of each of the factory's local defect types and 3 in-context-only
queries (the figures of sections 10 and 14 were measured with 6 local queries of the first four
types, before cutpaste, scar and texture_blend existed).

    python research/residual_signal.py                          # random small model, 18 categories, k = 2
    python research/residual_signal.py --model runs/quickstart/runs/stage3 --shifted-exemplars
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from iadgpt.data.factory import LOCAL_KINDS, category_spec, make_image
from iadgpt.model.checkpoint import init_model, load_model, load_processor
from iadgpt.evaluation.baseline import NearestPatchBaseline
from iadgpt.model.residuals import nearest_exemplar_tokens, nearest_patch_distances


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random small model)")
    parser.add_argument("--k", type=int, default=2, help="normal references per query")
    parser.add_argument("--categories", type=int, default=18, help="held-out categories (from index 10000)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="factory seed (the quickstart's --seed)")
    parser.add_argument("--shifted-exemplars", action="store_true",
                        help="half-patch-shifted copies of each reference in the patch bank")
    return parser.parse_args()


def encode(model, processor, images, references: int = 0):
    """Per image: its visual tokens `[n, d]` and their patches `[n, unit, C]`; the token grid; and
    for the first `references` images the patches of their shifted copies, as the model's patch bank
    gets them (`encode_shifted_copies`; none without `residuals.shifted_exemplars`)."""
    inputs = processor.image_processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    shifted = []
    if model.iadgpt.residuals.shifted_exemplars:
        shifted, _ = model.encode_shifted_copies(encoded.pixels_per_image[:references])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    merge = model.config.vision_config.spatial_merge_size
    return list(encoded.pooler_output), encoded.patches_per_token, (h // merge, w // merge), shifted


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    path = args.model or str(init_model(tempfile.mkdtemp() + "/random_small", "small", seed=0))
    # The encoder output carries each token's patches only with the residuals on.
    model = load_model(path, dtype=torch.float32,
                       iadgpt={"residuals": {"tokens": True, "shifted_exemplars": args.shifted_exemplars}}).eval()
    processor = load_processor(path)
    rng = np.random.default_rng(args.seed)
    baseline = NearestPatchBaseline(size=args.size)
    names = ("token", "patch", "patch_grid", "baseline")
    scores = {name: [] for name in names}
    rows = []  # (category, kind, label)
    pixels = {name: ([], []) for name in names}
    for index in range(10_000, 10_000 + args.categories):
        spec = category_spec(args.seed, index)
        references = [make_image(spec, "good", rng, args.size).image for _ in range(args.k)]
        queries = [("normal", make_image(spec, "good", rng, args.size)) for _ in range(6)]
        queries += [("local", make_image(spec, kind, rng, args.size)) for kind in LOCAL_KINDS]
        kinds = spec.in_context_kinds
        queries += [("in_context", make_image(spec, kinds[i % len(kinds)], rng, args.size)) for i in range(3)]
        tokens, patches, (h, w), shifted = encode(model, processor, references + [q.image for _, q in queries],
                                                  references=args.k)
        bank = torch.cat(tokens[:args.k])
        patch_bank = torch.cat(patches[:args.k] + shifted)
        reference_bank = baseline.memory_bank([Image.fromarray(r) for r in references])
        m = model.config.vision_config.spatial_merge_size
        for (kind, query), q_tokens, q_patches in zip(queries, tokens[args.k:], patches[args.k:]):
            patch_distance = nearest_patch_distances(q_patches, patch_bank)  # [tokens, m * m]
            maps = {"token": nearest_exemplar_tokens(q_tokens, bank)[1].view(h, w),
                    "patch": patch_distance.amax(-1).view(h, w),
                    # as the model lays its per-patch map out (IADGPTForConditionalGeneration._attach_maps)
                    "patch_grid": patch_distance.view(h, w, m, m).transpose(1, 2).reshape(h * m, w * m)}
            baseline_score, baseline_map = baseline(Image.fromarray(query.image),
                                                    [Image.fromarray(r) for r in references], reference_bank)
            rows.append((index, kind))
            for name, distance in {**maps, "baseline": torch.from_numpy(baseline_map)}.items():
                scores[name].append(baseline_score if name == "baseline" else float(distance.max()))
                if kind != "in_context":
                    mask = np.zeros((args.size, args.size), bool) if query.mask is None else np.asarray(query.mask) > 0
                    up = F.interpolate(distance[None, None].float(), size=mask.shape, mode="bilinear",
                                       align_corners=False)[0, 0].numpy()
                    pixels[name][0].append(mask.ravel())
                    pixels[name][1].append(up.ravel())
    categories = np.array([r[0] for r in rows])
    kinds = np.array([r[1] for r in rows])
    result = {"k": args.k, "categories": args.categories, "model": args.model or "random small",
              "shifted_exemplars": args.shifted_exemplars}
    for name, values in scores.items():
        s = np.array(values)
        for kind in ("local", "in_context"):
            per_category = []
            for c in np.unique(categories):
                pick = (categories == c) & np.isin(kinds, ["normal", kind])
                per_category.append(roc_auc_score(kinds[pick] == kind, s[pick]))
            result[f"{name}_image_auroc_{kind}"] = round(float(np.mean(per_category)), 3)
        result[f"{name}_pixel_auroc"] = round(float(roc_auc_score(np.concatenate(pixels[name][0]),
                                                                  np.concatenate(pixels[name][1]))), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
