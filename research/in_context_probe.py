"""Probe: how fast does a random-weight Qwen2.5-VL learn to compare a query with its references?

A stripped-down stage 3 for one question: every step draws fresh synthetic categories (never the
same product twice), k normal references and a query that is either another normal image or an
in-context-only defect (wrong colour, count or pattern: normal-looking on its own). The loss is the
cross-entropy of the "Yes"/"No" logits at the answer position only, the quantity the image score
reads. It prints the running decision accuracy on the training stream and, at the end, the image
AUROC on 128 queries of unseen categories. docs/experiments/2026-12-01-quickstart-experiments.md has the measured curves.

    python research/in_context_probe.py --k 1 --minutes 15          # k = 1 references
    python research/in_context_probe.py --k 0 --minutes 5           # control: nothing to compare with
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from iadgpt.data.factory import LOCAL_KINDS, category_spec, make_image
from iadgpt.model.checkpoint import PRESETS, init_model, load_model, load_processor
from iadgpt.model.prompts import few_shot_messages
from iadgpt.model.settings import DetectionQuestion
from iadgpt.training.collator import assistant_label_mask


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=1, help="normal references per query")
    parser.add_argument("--kind", choices=("in_context", "color", "local"), default="in_context",
                        help="defects of the positive queries (color: wrong colour only; local: the factory's "
                             "local types, of which sections 4 and 7 of docs/experiments/2026-12-01-quickstart-experiments.md used "
                             "the first four)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--preset", default="small", help="model preset")
    parser.add_argument("--patch", type=int, default=0, help="override the preset's patch size")
    parser.add_argument("--init-std", type=float, default=0.0, help="re-initialise the LLM's linear layers with this std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/in_context_probe", help="where the random checkpoint is written")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    preset = PRESETS[args.preset]
    if args.patch:
        preset = dataclasses.replace(preset, patch_size=args.patch)
    init_model(args.out, preset, seed=args.seed)
    processor, model = load_processor(args.out), load_model(args.out, dtype=torch.float32)
    if args.init_std:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "language_model" in name:
                torch.nn.init.normal_(module.weight, std=args.init_std)
    tokenizer = processor.tokenizer
    prefix = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    no_yes = [tokenizer.convert_tokens_to_ids("No"), tokenizer.convert_tokens_to_ids("Yes")]
    question = DetectionQuestion()
    rng = np.random.default_rng(args.seed)

    def sample(train: bool):
        # Training categories from [0, 1e6), evaluation categories from [1e6, 2e6): never shared.
        spec = category_spec(args.seed, int(rng.integers(0, 10**6)) + (0 if train else 10**6))
        references = [make_image(spec, "good", rng, args.size).image for _ in range(args.k)]
        defective = bool(rng.random() < 0.5)
        if not defective:
            return references, make_image(spec, "good", rng, args.size).image, False
        kinds = {"color": ("wrong_color",), "local": LOCAL_KINDS}.get(args.kind, spec.in_context_kinds)
        return references, make_image(spec, kinds[int(rng.integers(len(kinds)))], rng, args.size).image, True

    def batch(n: int, train: bool = True):
        texts, images, labels = [], [], []
        for _ in range(n):
            references, query, defective = sample(train)
            messages = few_shot_messages(args.k, question.text, answer="Yes" if defective else "No")
            texts.append(processor.apply_chat_template(messages, tokenize=False))
            images += [Image.fromarray(x) for x in [*references, query]]
            labels.append(defective)
        tokenizer.padding_side = "right"
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        # The logits that predict the first answer token sit one position before it.
        answer_at = assistant_label_mask(inputs["input_ids"], prefix, end).float().argmax(1) - 1
        return inputs, answer_at, torch.tensor(labels)

    def decision_logits(inputs, answer_at):
        logits = model(**inputs, logits_to_keep=0).logits
        return logits[torch.arange(len(answer_at)), answer_at][:, no_yes]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    started, step, accuracy = time.time(), 0, []
    while time.time() - started < args.minutes * 60:
        inputs, answer_at, labels = batch(args.batch)
        logits = decision_logits(inputs, answer_at)
        loss = torch.nn.functional.cross_entropy(logits, labels.long())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        accuracy.append(float(((logits[:, 1] > logits[:, 0]) == labels).float().mean()))
        step += 1
        if step % 100 == 0:
            print(f"step {step} {time.time() - started:.0f}s loss {loss.item():.3f} "
                  f"accuracy(last 100) {np.mean(accuracy[-100:]):.2f}", flush=True)
    model.eval()
    scores, truth = [], []
    with torch.no_grad():
        for _ in range(8):
            inputs, answer_at, labels = batch(16, train=False)
            scores += decision_logits(inputs, answer_at).softmax(-1)[:, 1].tolist()
            truth += labels.tolist()
    print(json.dumps({"probe": "in_context", "k": args.k, "kind": args.kind, "steps": step,
                      "train_accuracy_last_100": round(float(np.mean(accuracy[-100:])), 3),
                      "held_out_auroc": round(float(roc_auc_score(truth, scores)), 3)}))


if __name__ == "__main__":
    main()
