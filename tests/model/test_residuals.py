"""In-context residuals (`iadgpt.model.residuals`): the query tokens the language model sees."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from iadgpt.model import (ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY, detection_inputs, few_shot_messages, load_model,
                          load_processor)
from iadgpt.model.modeling_iadgpt import image_spans
from iadgpt.model.settings import DetectionQuestion
from iadgpt.model.residuals import ResidualEvidence, nearest_exemplar_tokens, patches_per_token, residual_features

RESIDUALS = {"exemplar_retention": 1.0, "residuals": {"tokens": True}}
EVIDENCE = {"exemplar_retention": 1.0, "residuals": {"tokens": True, "scores": True}}


def residual_model(checkpoint, seed: int = 0, compress: bool = False, **residuals):
    """A model with residuals (and the `residuals` settings given) whose residual weights are random
    (they start at zero); exemplars uncompressed unless `compress`."""
    settings = {"residuals": {"tokens": True, **residuals}, **({} if compress else {"exemplar_retention": 1.0})}
    model = load_model(checkpoint, iadgpt=settings).eval()
    generator = torch.Generator().manual_seed(seed)
    module = model.in_context_residual
    with torch.no_grad():
        module.residual_weight.copy_(torch.randn(module.residual_weight.shape, generator=generator) * 0.3)
        module.distance_embedding.copy_(torch.randn(module.distance_embedding.shape, generator=generator))
    return model


def language_model_inputs(model, inputs, **kwargs):
    """The inputs_embeds the language model receives in one forward."""
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
    finally:
        handle.remove()
    return seen["embeds"]


def test_nearest_exemplar_tokens_match_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    query, bank = torch.randn(7, 5, generator=generator), torch.randn(11, 5, generator=generator)
    nearest, distance = nearest_exemplar_tokens(query, bank)
    for i in range(7):
        cosines = [float(torch.dot(query[i], b) / (query[i].norm() * b.norm())) for b in bank]
        best = max(range(11), key=lambda j: cosines[j])
        assert torch.equal(nearest[i], bank[best])
        assert abs(float(distance[i]) - (1 - cosines[best])) < 1e-6


def test_patches_per_token_are_the_patches_the_merger_folds_into_each_token(tiny_checkpoint, tiny_processor,
                                                                            random_image):
    """The merger applied to the regrouped patches gives the visual tokens, in order, for images of
    several sizes (so the window order differs from the token order)."""
    model = load_model(tiny_checkpoint).eval()
    images = tiny_processor.image_processor(images=[random_image(), random_image(84, 196), random_image(168)],
                                            return_tensors="pt")
    with torch.no_grad():
        encoded = model.model.get_image_features(images["pixel_values"], images["image_grid_thw"], return_dict=True)
        patches = patches_per_token(encoded.last_hidden_state, images["image_grid_thw"], model.config.vision_config)
        for grouped, tokens in zip(patches, encoded.pooler_output):
            torch.testing.assert_close(model.model.visual.merger(grouped.flatten(0, 1)), tokens)
    with pytest.raises(ValueError, match="patch states hold 4 patches"):
        patches_per_token(encoded.last_hidden_state[:4], images["image_grid_thw"], model.config.vision_config)


def test_a_plain_checkpoint_starts_with_zero_residuals_and_unchanged_outputs(tiny_checkpoint, tiny_processor,
                                                                             random_image):
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    plain = load_model(tiny_checkpoint, iadgpt={"exemplar_retention": 1.0}).eval()
    with_residuals = load_model(tiny_checkpoint, iadgpt=RESIDUALS).eval()
    module = with_residuals.in_context_residual
    assert not module.residual_weight.any() and not module.distance_embedding.any()
    assert not hasattr(plain, "in_context_residual")
    with torch.no_grad():
        torch.testing.assert_close(with_residuals(**inputs).logits, plain(**inputs).logits, atol=1e-6, rtol=0)


def test_query_tokens_get_the_residual_to_the_nearest_token_of_any_exemplar(tiny_checkpoint, tiny_processor,
                                                                            random_image):
    """Hand-computed reference: per query token, the nearest token over both exemplars of its own
    sample (not the other sample's), W_r (q - e) + (1 - cos) e_d added; all other tokens untouched."""
    exemplars = [[random_image(), random_image(84)], [random_image(140), random_image()]]
    inputs = detection_inputs(tiny_processor, exemplars, [random_image(), random_image(112, 168)])
    model = residual_model(tiny_checkpoint)
    plain = load_model(tiny_checkpoint, iadgpt={"exemplar_retention": 1.0}).eval()
    seen, reference = language_model_inputs(model, inputs), language_model_inputs(plain, inputs)
    with torch.no_grad():
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                return_dict=True).pooler_output
        patches = patches_per_token(model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True).last_hidden_state,
            inputs["image_grid_thw"], model.config.vision_config)
    module = model.in_context_residual
    expected = reference.clone()
    spans = image_spans(inputs["input_ids"], model.config.image_token_id)

    def nearest(x, bank):
        cos = torch.nn.functional.cosine_similarity(x[None], bank, dim=-1)
        return bank[int(cos.argmax())], 1 - cos.max()

    for b in range(2):
        bank = torch.cat([images[3 * b], images[3 * b + 1]])
        patch_bank = torch.cat([patches[3 * b], patches[3 * b + 1]]).flatten(0, 1)
        start, end = spans[b][2]
        for t, q in enumerate(images[3 * b + 2]):
            e, d = nearest(q, bank)
            patch_d = torch.stack([nearest(p, patch_bank)[1] for p in patches[3 * b + 2][t]])
            features = torch.stack([d, patch_d.max(), patch_d.mean()])
            expected[b, start + t] = q + module.residual_weight @ (q - e) + features @ module.distance_embedding
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)
    assert (seen - reference).abs().amax(-1).gt(1e-4).sum() == sum(
        spans[b][2][1] - spans[b][2][0] for b in range(2))  # exactly the query tokens changed


def test_samples_without_exemplars_and_other_images_are_left_alone(tiny_checkpoint, tiny_processor, random_image):
    model = residual_model(tiny_checkpoint)
    plain = load_model(tiny_checkpoint, iadgpt={"exemplar_retention": 1.0}).eval()
    zero_shot = detection_inputs(tiny_processor, [[]], [random_image()])
    torch.testing.assert_close(language_model_inputs(model, zero_shot), language_model_inputs(plain, zero_shot))
    # Roles say which images are exemplars: an abnormal reference (OTHER) is not in the bank.
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    other = language_model_inputs(model, inputs, image_roles=[ROLE_OTHER, ROLE_EXEMPLAR, ROLE_QUERY])
    none = language_model_inputs(model, inputs, image_roles=[ROLE_OTHER, ROLE_OTHER, ROLE_QUERY])
    both = language_model_inputs(model, inputs)
    plain_embeds = language_model_inputs(plain, inputs)
    torch.testing.assert_close(none, plain_embeds)
    assert not torch.allclose(other, both) and not torch.allclose(other, plain_embeds)


def test_generation_and_batching_with_residuals_and_compression(tiny_checkpoint, tiny_processor, random_image):
    model = residual_model(tiny_checkpoint, compress=True)
    exemplars = [[random_image(), random_image(), random_image()], [random_image(84), random_image(), random_image()]]
    queries = [random_image(), random_image(168)]
    batch = detection_inputs(tiny_processor, exemplars, queries)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(3):
            pad = ids.shape[1] - batch["input_ids"].shape[1]
            step = {**batch, "input_ids": ids, "attention_mask": mask,
                    "mm_token_type_ids": torch.nn.functional.pad(batch["mm_token_type_ids"], (0, pad))}
            next_id = model(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_id], 1), torch.cat([mask, torch.ones_like(next_id)], 1)
        assert torch.equal(generated, ids)
        batched = model.image_anomaly_score(model(**batch, logits_to_keep=1).logits[:, -1])
        single = torch.cat([model.image_anomaly_score(model(**detection_inputs(tiny_processor, [e], [q]),
                                                            logits_to_keep=1).logits[:, -1])
                            for e, q in zip(exemplars, queries)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_residual_weights_learn_survive_save_load_and_run_on_batches_without_exemplars(
        tiny_checkpoint, tiny_processor, random_image, tmp_path):
    model = load_model(tiny_checkpoint, iadgpt=RESIDUALS).train()
    inputs = detection_inputs(tiny_processor, [[random_image()]], [random_image()])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    module = model.in_context_residual
    assert module.residual_weight.grad.abs().sum() > 0 and module.distance_embedding.grad.abs().sum() > 0
    # A caption batch (no exemplars) runs the module times zero: same loss, zero but present gradients.
    model.zero_grad()
    caption = detection_inputs(tiny_processor, [[]], [random_image()])
    labels = caption["input_ids"].masked_fill(caption["attention_mask"] == 0, -100)
    out = model(**caption, labels=labels)
    torch.testing.assert_close(out.loss, out.lm_loss)
    out.loss.backward()
    assert module.distance_embedding.grad is not None and not module.distance_embedding.grad.any()

    trained = residual_model(tiny_checkpoint, seed=3)
    trained.save_pretrained(tmp_path / "saved")
    load_processor(tiny_checkpoint).save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved").eval()
    assert reloaded.iadgpt.residuals.tokens
    assert torch.equal(reloaded.in_context_residual.distance_embedding, trained.in_context_residual.distance_embedding)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained(**inputs).logits)


def test_the_residual_module_runs_once_per_training_forward_whatever_the_batch(tiny_checkpoint, tiny_processor,
                                                                              random_image):
    """ZeRO-3 gathers a module's weights collectively at every call: each rank must call it equally
    often, whether its batch holds two few-shot samples, one, or none (captions)."""
    model = load_model(tiny_checkpoint, iadgpt=EVIDENCE).train()
    calls, evidence_calls = [], []
    model.in_context_residual.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    model.residual_evidence.register_forward_hook(lambda module, args, output: evidence_calls.append(1))
    two = detection_inputs(tiny_processor, [[random_image()], [random_image(), random_image()]],
                           [random_image(), random_image()])
    none = detection_inputs(tiny_processor, [[]], [random_image()])
    for inputs in (two, none):
        calls.clear()
        evidence_calls.clear()
        model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
        assert len(calls) == len(evidence_calls) == 1
    tokens_per_query = (two["image_grid_thw"][-1].prod() // 4).item()
    model(**two, labels=two["input_ids"].masked_fill(two["attention_mask"] == 0, -100))
    assert calls[-1] == 2 * tokens_per_query  # both samples' query tokens in the one call



def evidence_model(checkpoint, seed: int = 0, **settings):
    """A model with residual scores whose residual and evidence weights are random (both start at zero)."""
    model = residual_model(checkpoint, seed, scores=True, **settings)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for weight in model.residual_evidence.parameters():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    return model


def query_distances(model, inputs, exemplar_images: list[int], query_image: int):
    """`[n, 3]` residual distances and `[n, 4]` patch distances of one query image against the given
    exemplar images (all in batch order)."""
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    tokens, patches = encoded.pooler_output, encoded.patches_per_token
    return residual_features(tokens[query_image], torch.cat([tokens[i] for i in exemplar_images]),
                             patches[query_image], torch.cat([patches[i] for i in exemplar_images]))[1:]


def test_residual_evidence_is_added_to_the_image_score_and_the_map_in_logit_space(tiny_checkpoint, tiny_processor,
                                                                                  random_image):
    """Hand-computed reference: image score sigmoid(l_yes - l_no + r) with r = GAIN (max/mean of the
    query's distances . w + b), split over the Yes / No logits at the answer position only; map, per vision
    patch, sigmoid(logit(p) + GAIN ((d_patch, d_token, d_patch_mean) . v + c)), p the token map
    without evidence; a sample without exemplars gets no evidence."""
    model = evidence_model(tiny_checkpoint)
    without = residual_model(tiny_checkpoint)  # the same residual weights, no evidence
    evidence = model.residual_evidence
    for exemplars in ([random_image(), random_image(84)], []):
        inputs = detection_inputs(tiny_processor, [exemplars], [random_image(112, 168)])
        with torch.no_grad():
            out = model(**inputs, pixel_maps=True, logits_to_keep=2)
            reference = without(**inputs, pixel_maps=True, logits_to_keep=2)
        yes, no = model.yes_no_token_ids
        margin = reference.logits[0, -1, yes] - reference.logits[0, -1, no]
        if not exemplars:
            assert out.residual_logits is None
            torch.testing.assert_close(out.logits, reference.logits)
            torch.testing.assert_close(out.pixel_scores[0], reference.pixel_scores[0])
            continue
        changed = (out.logits - reference.logits).abs() > 1e-4
        assert changed.sum() == 2 and changed[0, -1, yes] and changed[0, -1, no]
        distances, patch_distances = query_distances(model, inputs, [0, 1], 2)
        pooled = torch.cat([distances.max(0).values, distances.mean(0)])
        r_image = ResidualEvidence.GAIN * (pooled @ evidence.image_weight + evidence.image_bias)
        torch.testing.assert_close(out.residual_logits, r_image.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.image_anomaly_score(out.logits[:, -1]),
                                   torch.sigmoid(margin + r_image).detach(), atol=1e-6, rtol=1e-5)
        p = reference.pixel_scores[0]
        h, w = p.shape
        expected = torch.empty(2 * h, 2 * w)
        v, c = evidence.patch_weight.detach(), evidence.patch_bias.detach()
        for t in range(h * w):
            for unit in range(4):  # the merger folds patches (2i + a, 2j + b) into token (i, j), a-major
                i, j, a, b = t // w, t % w, unit // 2, unit % 2
                features = torch.stack([patch_distances[t, unit], distances[t, 0], distances[t, 2]])
                r = ResidualEvidence.GAIN * (features @ v + c)
                expected[2 * i + a, 2 * j + b] = torch.sigmoid(torch.logit(p[i, j], eps=1e-6) + r)
        torch.testing.assert_close(out.pixel_scores[0], expected, atol=1e-5, rtol=1e-5)
        assert (out.pixel_scores[0] - p.repeat_interleave(2, 0).repeat_interleave(2, 1)).abs().max() > 0.05


def test_residual_evidence_starts_at_zero_and_learns_from_the_score_and_pixel_losses(
        tiny_checkpoint, tiny_processor, random_image, tmp_path):
    with pytest.raises(ValueError, match=r"residuals.scores adds .* needs residuals.tokens=true"):
        load_model(tiny_checkpoint, iadgpt={"residuals": {"scores": True}})
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    fresh = load_model(tiny_checkpoint, iadgpt=EVIDENCE).eval()
    assert not any(weight.any() for weight in fresh.residual_evidence.parameters())
    plain = load_model(tiny_checkpoint, iadgpt=RESIDUALS).eval()
    with torch.no_grad():
        a, b = fresh(**inputs, pixel_maps=True), plain(**inputs, pixel_maps=True)
    torch.testing.assert_close(fresh.image_anomaly_score(a.logits[:, -1]), plain.image_anomaly_score(b.logits[:, -1]))
    # The map gets the vision patches' grid, each patch its token's value until evidence is learned.
    fine = b.pixel_scores[0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(a.pixel_scores[0], fine, atol=1e-6, rtol=0)

    # One training step: the score loss is the cross-entropy of the evidence-shifted Yes/No pair, and
    # both losses reach the evidence weights.
    model = evidence_model(tiny_checkpoint).train()
    model.iadgpt.score_loss_weight = 1.0
    question = model.iadgpt.detection_question.text
    text = tiny_processor.apply_chat_template(few_shot_messages(1, question, answer="Yes, a scratch."), tokenize=False)
    images = [random_image(), random_image()]
    batch = tiny_processor(text=[text], images=images, return_tensors="pt")
    prefix = tiny_processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    row = batch["input_ids"][0].tolist()
    start = next(i + len(prefix) for i in range(len(row)) if row[i:i + len(prefix)] == prefix)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, start:] = batch["input_ids"][0, start:]
    mask = torch.zeros(112, 112)
    mask[30:60, 40:80] = 1
    out = model(**batch, labels=labels, pixel_masks=[mask])
    reference = residual_model(tiny_checkpoint).train()(**batch, labels=labels)
    yes, no = model.yes_no_token_ids
    pair = reference.logits[0, start - 1, [yes, no]].float() + torch.stack([out.residual_logits[0], torch.tensor(0.0)])
    torch.testing.assert_close(out.score_loss, -pair.log_softmax(-1)[0])
    changed = (out.logits - reference.logits).abs() > 1e-4  # the evidence sits on the answer's Yes / No only
    assert changed.sum() == 2 and changed[0, start - 1, yes] and changed[0, start - 1, no]
    out.loss.backward()
    for name, weight in model.residual_evidence.named_parameters():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name

    model.save_pretrained(tmp_path / "saved")
    load_processor(tiny_checkpoint).save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    assert reloaded.iadgpt.residuals.scores
    assert torch.equal(reloaded.residual_evidence.image_weight, model.residual_evidence.image_weight)


def test_generation_answers_the_detection_question_with_the_evidence(tiny_checkpoint, tiny_processor, random_image):
    """Strong evidence makes the generated answer to the detection question agree with the score
    ("Yes" for a defect, "No" otherwise); another question is left to the language model."""
    model = evidence_model(tiny_checkpoint).eval()
    yes, no = model.yes_no_token_ids
    inputs = detection_inputs(tiny_processor, [[random_image()], [random_image(), random_image()]],
                              [random_image(), random_image()])
    other = detection_inputs(tiny_processor, [[random_image()]], [random_image()],
                             question=DetectionQuestion(text="Describe the query image."))
    with torch.no_grad():
        model.residual_evidence.image_weight.zero_()
        plain_first = model.generate(**other, max_new_tokens=1, do_sample=False)[:, -1]
        for bias, answer in ((1.0, yes), (-1.0, no)):  # GAIN x 1: +-100 logits
            model.residual_evidence.image_bias.fill_(bias)
            first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
            assert first.tolist() == [answer, answer]
            scores = model.image_anomaly_score(model(**inputs, logits_to_keep=1).logits[:, -1])
            assert scores.gt(0.99).all() if answer == yes else scores.lt(0.01).all()
            assert torch.equal(model.generate(**other, max_new_tokens=1, do_sample=False)[:, -1], plain_first)


# -- shifted exemplars (residuals.shifted_exemplars) --------------------------------------------------------

def moved(image, rows: int, cols: int, by: int):
    """The image's content moved by (rows, cols) x `by` pixels, edge pixels repeated."""
    import numpy as np
    from PIL import Image

    pixels = np.pad(np.asarray(image), ((by, by), (by, by), (0, 0)), mode="edge")
    height, width = image.height, image.width
    top, left = by - rows * by, by - cols * by
    return Image.fromarray(pixels[top:top + height, left:left + width])


def test_shifted_image_pixels_are_the_processed_moved_images(tiny_checkpoint, tiny_processor, random_image):
    from iadgpt.model.residuals import shifted_image_pixels

    eight_directions = ((0, 1), (1, 0), (1, 1), (0, -1), (-1, 0), (-1, -1), (1, -1), (-1, 1))

    vision = load_model(tiny_checkpoint).config.vision_config
    images = [random_image(), random_image(84, 196)]  # multiples of 28: the processor does not resize them
    processed = tiny_processor.image_processor(images=images, return_tensors="pt")
    pixels, grids = shifted_image_pixels(processed["pixel_values"], processed["image_grid_thw"], vision,
                                         eight_directions)
    expected = tiny_processor.image_processor(
        images=[moved(image, r, c, vision.patch_size // 2) for image in images for r, c in eight_directions],
        return_tensors="pt")
    torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(grids, expected["image_grid_thw"])


def test_shifted_exemplar_patches_join_the_patch_bank(tiny_checkpoint, tiny_processor, random_image):
    """Hand-computed reference: each query patch's distance is taken over the exemplars' patches and
    those of the exemplars moved by half a patch (encoded as images of their own); tokens are still
    matched against the unshifted exemplars only."""
    from iadgpt.model.residuals import HALF_PATCH_SHIFTS

    exemplars, query = [random_image(), random_image()], random_image()
    inputs = detection_inputs(tiny_processor, [exemplars], [query])
    model = residual_model(tiny_checkpoint, shifted_exemplars=True)
    plain = load_model(tiny_checkpoint, iadgpt={"exemplar_retention": 1.0}).eval()
    seen, reference = language_model_inputs(model, inputs), language_model_inputs(plain, inputs)
    half = model.config.vision_config.patch_size // 2
    copies = [moved(image, r, c, half) for image in exemplars for r, c in HALF_PATCH_SHIFTS]
    everything = tiny_processor.image_processor(images=exemplars + [query] + copies, return_tensors="pt")
    with torch.no_grad():
        encoded = model.model.get_image_features(everything["pixel_values"], everything["image_grid_thw"],
                                                 return_dict=True)
    tokens, patches = encoded.pooler_output, encoded.patches_per_token
    patch_bank = torch.cat([patches[0], patches[1]] + list(patches[3:])).flatten(0, 1)
    bank = torch.cat([tokens[0], tokens[1]])
    module = model.in_context_residual
    expected = reference.clone()
    start, _ = image_spans(inputs["input_ids"], model.config.image_token_id)[0][2]

    def nearest(x, candidates):
        cos = torch.nn.functional.cosine_similarity(x[None], candidates, dim=-1)
        return candidates[int(cos.argmax())], 1 - cos.max()

    for t, q in enumerate(tokens[2]):
        e, d = nearest(q, bank)
        patch_d = torch.stack([nearest(p, patch_bank)[1] for p in patches[2][t]])
        features = torch.stack([d, patch_d.max(), patch_d.mean()])
        expected[0, start + t] = q + module.residual_weight @ (q - e) + features @ module.distance_embedding
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)
    # the shifted bank is a superset: no patch can be farther from it
    unshifted = residual_model(tiny_checkpoint)
    assert not torch.allclose(seen, language_model_inputs(unshifted, inputs), atol=1e-4)
    # generate() encodes the images first and passes the encoder output on: same prompt tokens
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        torch.testing.assert_close(generated.logits[0], model(**inputs).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_shifted_exemplars_cost_one_more_vision_call_per_training_forward_whatever_the_batch(
        tiny_checkpoint, tiny_processor, random_image):
    """ZeRO-3: every rank runs the vision tower equally often (twice: the prompt's images, then the
    shifted exemplars or a blank stand-in), with exemplars, without, and with no image at all."""
    model = load_model(tiny_checkpoint, iadgpt={"exemplar_retention": 1.0, "residuals": {"tokens": True, "shifted_exemplars": True}}).train()
    calls = []
    model.model.visual.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs.get("grid_thw", args[-1]).shape[0]), with_kwargs=True)
    few_shot = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    zero_shot = detection_inputs(tiny_processor, [[]], [random_image()])
    dummy = tiny_processor.image_processor(images=[random_image(28)], return_tensors="pt")
    text = tiny_processor.tokenizer(["a product without a picture"], return_tensors="pt")
    text_only = {**text, "dummy_pixel_values": dummy["pixel_values"], "dummy_image_grid_thw": dummy["image_grid_thw"]}
    for inputs, images in ((few_shot, [3, 6]), (zero_shot, [1, 1]), (text_only, [1, 1])):
        calls.clear()
        model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss.backward()
        assert calls == images  # images per vision call


@pytest.mark.parametrize("settings, message", [
    ({"residuals": {"shifted_exemplars": True}}, "needs residuals.tokens=true"),
    ({"residuals": {"tokens": True, "shifted_exemplars": 3}}, "residuals.shifted_exemplars=3: expected true or false"),
    ({"in_context_residuals": True, "exemplar_shifts": 8},
     r"exemplar_shifts=8 \(a setting of earlier releases, now residuals.shifted_exemplars\): only \[0, 3\] can be read"),
])
def test_shifted_exemplars_settings_are_checked(tiny_checkpoint, settings, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_checkpoint, iadgpt=settings)


# -- the map's half-patch lattice (residuals.shifted_query) ---------------------------------------------------

def test_lattice_evidence_averages_the_patch_of_every_grid_that_covers_each_cell():
    """Reference from pixel coordinates: the cell's centre, and the patch of each grid (moved down /
    right by half a patch) that contains it; the moved grids' last half patch is edge padding, whose
    cells take the grid's last patch."""
    from iadgpt.model.residuals import HALF_PATCH_SHIFTS, lattice_evidence

    generator = torch.Generator().manual_seed(0)
    height, width, patch = 3, 4, 10
    grids = {shift: torch.randn(height, width, generator=generator) for shift in ((0, 0),) + HALF_PATCH_SHIFTS}
    expected = torch.zeros(2 * height, 2 * width)
    for n in range(2 * height):
        for q in range(2 * width):
            y, x = (n + 0.5) * patch / 2, (q + 0.5) * patch / 2
            for (down, right), grid in grids.items():
                i = min(int((y + down * patch / 2) // patch), height - 1)
                j = min(int((x + right * patch / 2) // patch), width - 1)
                expected[n, q] += grid[i, j] / len(grids)
    torch.testing.assert_close(lattice_evidence(grids), expected)


def test_shifted_query_draws_the_map_evidence_on_the_half_patch_lattice(tiny_checkpoint, tiny_processor, random_image):
    """Reference: the query moved by half a patch, scored as a query of its own against the same
    exemplars, gives each shifted grid's patch evidence; the map is sigmoid(logit(p) + lattice
    evidence) on cells of half a patch, p the token map. The image score and the language model's
    input do not change."""
    from iadgpt.model.residuals import HALF_PATCH_SHIFTS, lattice_evidence, patch_grid

    exemplars, query = [random_image(), random_image()], random_image(112, 168)
    inputs = detection_inputs(tiny_processor, [exemplars], [query])
    lattice = evidence_model(tiny_checkpoint, shifted_query=True)
    grid = evidence_model(tiny_checkpoint)  # the same weights
    tokens_only = residual_model(tiny_checkpoint)  # the same residual weights, no evidence: p
    with torch.no_grad():
        out, plain, p = (m(**inputs, pixel_maps=True, logits_to_keep=2) for m in (lattice, grid, tokens_only))
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.residual_logits, plain.residual_logits)
    torch.testing.assert_close(language_model_inputs(lattice, inputs), language_model_inputs(grid, inputs))

    half = lattice.config.vision_config.patch_size // 2
    h, w = p.pixel_scores[0].shape
    evidence = {}
    for shift in ((0, 0),) + HALF_PATCH_SHIFTS:
        moved_inputs = detection_inputs(tiny_processor, [exemplars], [moved(query, *shift, half)])
        distances, patch_distances = query_distances(grid, moved_inputs, [0, 1], 2)
        with torch.no_grad():
            per_patch, _ = grid.residual_evidence([distances], [patch_distances])
        evidence[shift] = patch_grid(per_patch[0], h, w, 2)
    tokens = torch.logit(p.pixel_scores[0], eps=1e-6).repeat_interleave(4, 0).repeat_interleave(4, 1)
    expected = torch.sigmoid(tokens + lattice_evidence(evidence))
    assert out.pixel_scores[0].shape == (4 * h, 4 * w)
    torch.testing.assert_close(out.pixel_scores[0], expected, atol=1e-5, rtol=1e-5)
    # the copies changed the map: it is not the patch grid's map at twice the resolution
    on_the_grid = plain.pixel_scores[0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert (torch.logit(out.pixel_scores[0]) - torch.logit(on_the_grid)).abs().max() > 0.1


def test_shifted_query_adds_the_map_queries_copies_to_the_one_extra_vision_call_and_learn(
        tiny_checkpoint, tiny_processor, random_image):
    """ZeRO-3: still one extra vision call per training forward; it holds the shifted exemplars and,
    for samples whose map is trained, the shifted query. The pixel loss reaches the evidence weights."""
    model = evidence_model(tiny_checkpoint, shifted_exemplars=True, shifted_query=True).train()
    calls = []
    model.model.visual.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs.get("grid_thw", args[-1]).shape[0]), with_kwargs=True)
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    labels = torch.full_like(inputs["input_ids"], -100)  # the prompt's anomaly words stay prompt words
    labels[:, -1] = inputs["input_ids"][:, -1]
    mask = torch.zeros(112, 112)
    mask[30:60, 40:80] = 1
    for masks, images in ((None, [3, 6]), ([mask], [3, 9])):
        calls.clear()
        model.zero_grad()
        out = model(**inputs, labels=labels, pixel_masks=masks)
        out.loss.backward()
        assert calls == images  # images per vision call
    assert out.pixel_scores[0].shape == (4 * 4, 4 * 4)  # 112 px: 4 x 4 tokens, 16 x 16 half-patch cells
    assert model.residual_evidence.patch_weight.grad.abs().sum() > 0


def test_map_without_attention_is_the_evidence_alone_where_there_are_exemplars(tiny_checkpoint, tiny_processor,
                                                                              random_image):
    """Reference: sigmoid(evidence), the evidence read off the map with the attention in it,
    sigmoid(logit(p) + evidence) (the same weights); a sample without exemplars keeps the attention map p."""
    weighted = evidence_model(tiny_checkpoint, map_attention=False)
    unweighted = evidence_model(tiny_checkpoint)
    tokens_only = residual_model(tiny_checkpoint)
    with torch.no_grad():
        for model in (weighted, unweighted, tokens_only):  # a random model's attention is near uniform: sharpen it
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
        for model in (weighted, unweighted):  # evidence of a few logits, not saturating the map
            for weight in model.residual_evidence.parameters():
                weight.mul_(0.01)
    for exemplars in ([random_image(), random_image()], []):
        inputs = detection_inputs(tiny_processor, [exemplars], [random_image()])
        with torch.no_grad():
            out, one, p = (m(**inputs, pixel_maps=True) for m in (weighted, unweighted, tokens_only))
        if not exemplars:
            torch.testing.assert_close(out.pixel_scores[0], p.pixel_scores[0])
            continue
        attention = torch.logit(p.pixel_scores[0], eps=1e-6).repeat_interleave(2, 0).repeat_interleave(2, 1)
        evidence = torch.logit(one.pixel_scores[0]) - attention
        torch.testing.assert_close(torch.logit(out.pixel_scores[0]), evidence, atol=1e-4, rtol=0)
        assert attention.abs().max() > 0.01  # the attention map is not flat: leaving it out shows


@pytest.mark.parametrize("settings, message", [
    ({"map_attention_weight": 0.25},
     r"map_attention_weight=0.25 \(a setting of earlier releases, now residuals.map_attention\): only \[0.0, 1.0\]"),
    ({"residuals": {"tokens": True, "shifted_query": True}}, "needs residuals.scores=true"),
    ({"residuals": {"tokens": True, "scores": True, "shifted_query": 3}}, "residuals.shifted_query=3: expected true or false"),
    ({"residuals": {"tokens": True, "scores": True, "attention_map": False}}, r"Unknown IADGPT settings \['residuals.attention_map'\]"),
])
def test_shifted_query_and_map_attention_settings_are_checked(tiny_checkpoint, settings, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_checkpoint, iadgpt=settings)


# -- checkpoints written before the settings were grouped ---------------------------------------------

RELEASED_FLAT_SETTINGS = {  # config.json "iadgpt" of a quickstart stage-1 checkpoint of the flat layout
    "anomaly_words": ["defect", "defective", "defects", "anomaly", "anomalous", "abnormal", "damaged"],
    "attention_map_layers": [1, 2], "compress_exemplars": True,
    "detection_question": {"defect_answer": "Yes",
                           "text": "Is there any defect or anomaly in the query image? Answer Yes or No."},
    "exemplar_retention": 0.2, "exemplar_shifts": 3, "focal_alpha": None, "focal_gamma": 2.0,
    "fusion_init_last_weight": None, "image_score_map_weight": 0.75, "in_context_residuals": True,
    "map_attention_weight": 0.0, "normal_words": ["normal", "flawless", "good"], "pixel_loss_weight": 1.0,
    "query_shifts": 3, "residual_scores": True, "score_loss_weight": 1.0, "vision_fusion_layers": [1, 2]}


def test_a_checkpoint_of_the_flat_layout_loads_with_the_same_settings_and_outputs(
        tiny_checkpoint, tiny_processor, random_image, tmp_path):
    import json

    grouped = evidence_model(tiny_checkpoint, compress=True, shifted_exemplars=True, shifted_query=True,
                             map_attention=False, image_score_map_weight=0.75)
    grouped.save_pretrained(tmp_path / "flat")
    tiny_processor.save_pretrained(tmp_path / "flat")
    config = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert config["iadgpt"]["residuals"]["shifted_query"] is True
    config["iadgpt"] = {**RELEASED_FLAT_SETTINGS, "attention_map_layers": config["iadgpt"]["attention_map_layers"],
                        "vision_fusion_layers": config["iadgpt"]["vision_fusion_layers"],
                        "score_loss_weight": config["iadgpt"]["score_loss_weight"]}
    (tmp_path / "flat" / "config.json").write_text(json.dumps(config))

    flat = load_model(tmp_path / "flat").eval()
    assert flat.iadgpt == grouped.iadgpt
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image(), random_image()]], [random_image()])
    with torch.no_grad():
        a, b = flat(**inputs, pixel_maps=True), grouped(**inputs, pixel_maps=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pixel_scores[0], b.pixel_scores[0])
    # overrides merge into the group key by key, over the flat layout too
    assert load_model(tmp_path / "flat", iadgpt={"residuals": {"map_attention": True}}).iadgpt.residuals == \
        dataclasses.replace(grouped.iadgpt.residuals, map_attention=True)
    # saved again, it is written in the grouped layout
    flat.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["iadgpt"] == grouped.iadgpt.to_dict()


def test_compress_exemplars_false_of_the_flat_layout_keeps_every_token():
    from iadgpt.model.settings import IADGPTSettings

    assert IADGPTSettings.from_dict({"compress_exemplars": False, "exemplar_retention": 0.2}).exemplar_retention == 1.0
    assert IADGPTSettings.from_dict({"compress_exemplars": True}).exemplar_retention == 0.2
