"""A reference set encoded once (`ReferencePrefix`): queries after it get the whole prompt's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iadgpt.inspection import Inspector
from iadgpt.model import detection_inputs, few_shot_messages, load_model
from iadgpt.model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY
from iadgpt.model.prompts import generation_inputs, split_before_query

RESIDUALS = {"tokens": True, "scores": True, "shifted_exemplars": True, "shifted_query": True,
             "map_attention": False, "image_score_map_weight": 0.75}
SETTINGS = {"compressed": {}, "uncompressed": {"exemplar_retention": 1.0}, "residuals": {"residuals": RESIDUALS}}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def model(request, tiny_checkpoint):
    """The tiny model with sharpened attention (a random model's is near uniform, which would hide a
    wrong map) and random residual weights (they start at zero)."""
    model = load_model(tiny_checkpoint, iadgpt=SETTINGS[request.param]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
        for name, weight in model.named_parameters():
            if name.startswith(("in_context_residual", "residual_evidence")):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


def split_inputs(processor, model, normals, abnormal, queries):
    """The prefix's processor inputs (one prompt up to the query image) and the queries' own parts."""
    prompt = processor.apply_chat_template(few_shot_messages(len(normals), model.iadgpt.detection_question.text,
                                                             num_abnormal_references=len(abnormal)),
                                           tokenize=False, add_generation_prompt=True)
    head, tail = split_before_query(prompt)
    prefix = processor(text=[head], images=[*normals, *abnormal] or None, return_tensors="pt")
    return prefix, processor(text=[tail] * len(queries), images=queries, return_tensors="pt")


@pytest.mark.parametrize("shots, batch", [(1, 1), (2, 4), (4, 1), (4, 4)])
def test_queries_after_the_prefix_equal_whole_prompts(model, tiny_processor, random_image, shots, batch):
    normals = [random_image() for _ in range(shots)]
    queries = [random_image() for _ in range(batch)]
    whole_inputs = detection_inputs(tiny_processor, [normals] * batch, queries)
    prefix_inputs, query_inputs = split_inputs(tiny_processor, model, normals, [], queries)
    # the two parts are the whole prompt's tokens
    assert torch.equal(torch.cat([prefix_inputs["input_ids"].expand(batch, -1), query_inputs["input_ids"]], 1),
                       whole_inputs["input_ids"])
    with torch.no_grad():
        whole = model(**whole_inputs, pixel_maps=True, logits_to_keep=1)
        prefix = model.encode_reference_prefix(prefix_inputs["input_ids"], prefix_inputs["pixel_values"],
                                               prefix_inputs["image_grid_thw"])
        after = model(**query_inputs, reference_prefix=prefix, pixel_maps=True, logits_to_keep=1)
        again = model(**query_inputs, reference_prefix=prefix, pixel_maps=True, logits_to_keep=1)
    torch.testing.assert_close(after.logits, whole.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.image_anomaly_score(after.logits[:, -1], after.pixel_scores),
                               model.image_anomaly_score(whole.logits[:, -1], whole.pixel_scores), atol=1e-4, rtol=0)
    for mine, theirs in zip(after.pixel_scores, whole.pixel_scores):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert max(float(m.std()) for m in whole.pixel_scores) > 1e-3  # the maps are not flat: a difference shows
    if whole.kept_tokens is not None:
        assert torch.equal(after.kept_tokens, whole.kept_tokens)
    # the stored prefix is not consumed by a forward: a second batch gets the same
    torch.testing.assert_close(again.logits, after.logits, atol=0, rtol=0)
    assert prefix.cache.get_seq_length() == prefix.kept_length


def test_abnormal_references_and_no_normals_sit_in_the_prefix(model, tiny_processor, random_image):
    queries = [random_image(), random_image()]
    for normals, abnormal in (([random_image(), random_image()], [random_image()]), ([], [])):
        roles = [ROLE_EXEMPLAR] * len(normals) + [ROLE_OTHER] * len(abnormal) + [ROLE_QUERY]
        messages = few_shot_messages(len(normals), model.iadgpt.detection_question.text,
                                     num_abnormal_references=len(abnormal))
        whole_inputs = generation_inputs(tiny_processor, [(messages, [*normals, *abnormal, q], roles) for q in queries])
        prefix_inputs, query_inputs = split_inputs(tiny_processor, model, normals, abnormal, queries)
        with torch.no_grad():
            whole = model(**whole_inputs, pixel_maps=True, logits_to_keep=1)
            prefix = model.encode_reference_prefix(prefix_inputs["input_ids"], prefix_inputs.get("pixel_values"),
                                                   prefix_inputs.get("image_grid_thw"), image_roles=roles[:-1])
            after = model(**query_inputs, reference_prefix=prefix, pixel_maps=True, logits_to_keep=1)
        torch.testing.assert_close(after.logits, whole.logits, atol=1e-4, rtol=0)
        for mine, theirs in zip(after.pixel_scores, whole.pixel_scores):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_a_prefix_call_refuses_what_it_cannot_serve(model, tiny_processor, random_image):
    normals = [random_image(), random_image()]
    prefix_inputs, query_inputs = split_inputs(tiny_processor, model, normals, [], [random_image()])
    with torch.no_grad():
        prefix = model.encode_reference_prefix(prefix_inputs["input_ids"], prefix_inputs["pixel_values"],
                                               prefix_inputs["image_grid_thw"])
        padded = {**query_inputs, "attention_mask": torch.nn.functional.pad(query_inputs["attention_mask"], (1, 0)),
                  "input_ids": torch.nn.functional.pad(query_inputs["input_ids"], (1, 0))}
        with pytest.raises(ValueError, match="batch queries of the same image size together"):
            model(**padded, reference_prefix=prefix)
        with pytest.raises(ValueError, match="no training, labels or pixel_masks"):
            model(**query_inputs, reference_prefix=prefix, labels=query_inputs["input_ids"])
        with pytest.raises(ValueError, match="no query"):
            model.encode_reference_prefix(prefix_inputs["input_ids"], prefix_inputs["pixel_values"],
                                          prefix_inputs["image_grid_thw"], image_roles=[ROLE_EXEMPLAR, ROLE_QUERY])


def test_the_inspector_groups_queries_by_reference_set_and_size_and_keeps_order(tiny_checkpoint, random_image):
    cached = Inspector.from_pretrained(tiny_checkpoint, batch_size=2, reference_cache_size=2)
    whole = Inspector(cached.model, cached.processor, batch_size=2, reference_cache_size=0)
    product_a, product_b = [random_image() for _ in range(3)], [random_image(), random_image()]
    queries = [random_image(), random_image(84), random_image(), random_image(), random_image(84), random_image()]
    normals = [product_a, product_a, product_b, product_a, product_a, product_b]
    abnormal = [[], [], [], [], [], [random_image()]]
    calls = []
    cached.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    fast = cached.inspect(queries, normals, abnormal)
    cached_calls = list(calls)
    slow = whole.inspect(queries, normals, abnormal)
    for a, b in zip(fast, slow):
        assert abs(a.score - b.score) < 1e-4 and np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4
        assert a.anomaly_map.shape == b.anomaly_map.shape
    # Groups (set, size): (a, 112) q0 q3, (a, 84) q1 q4, (b, 112) q2, (b + abnormal, 112) q5. Each set's
    # prefix is encoded once (a batch-1 forward) before its first group; three sets, two kept.
    assert cached_calls == [1, 2, 2, 1, 1, 1, 1]
    assert len(cached._prefixes) == 2
    # the same references as new image objects hit the cache (the key is the pixels)
    calls.clear()
    copies = [image.copy() for image in product_b]
    cached.inspect([queries[2]], [copies], [abnormal[2]])
    assert calls == [1]  # the query only: its prefix was still cached


@pytest.mark.parametrize("settings", [{}, {"exemplar_retention": 1.0}])
def test_text_answers_continue_from_the_scoring_pass(tiny_checkpoint, random_image, settings):
    """The answer after a reference prefix equals generate() on whole prompts, and no forward runs the
    prompt again: after the prefix, one forward of the queries' part, then one-token steps."""
    cached = Inspector.from_pretrained(tiny_checkpoint, batch_size=4, iadgpt=settings)
    whole = Inspector(cached.model, cached.processor, batch_size=4, reference_cache_size=0)
    normals, queries = [random_image() for _ in range(3)], [random_image() for _ in range(3)]
    lengths = []
    handle = cached.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    fast = cached.inspect(queries, [normals] * 3, with_text=True, max_new_tokens=8)
    handle.remove()
    slow = whole.inspect(queries, [normals] * 3, with_text=True, max_new_tokens=8)
    assert [r.text for r in fast] == [r.text for r in slow] and all(r.text for r in fast)
    prefix_length, query_length, *steps = lengths
    assert query_length < prefix_length and steps == [1] * 7


def test_greedy_continuation_pads_a_finished_sample_with_its_stop_token(tiny_checkpoint, random_image):
    inspector = Inspector.from_pretrained(tiny_checkpoint)
    normals, queries = [random_image(), random_image()], [random_image(), random_image()]
    inputs = inspector.batch_inputs(queries, [normals] * 2, [[], []])
    with torch.no_grad():
        out = inspector.model(**inputs, use_cache=True, logits_to_keep=1)
        free = inspector.model.continue_greedy(out, inputs["attention_mask"], 5, stop_token_ids=[])
        out = inspector.model(**inputs, use_cache=True, logits_to_keep=1)
        stop = int(free[0, 1])  # sample 0's second token ends it
        stopped = inspector.model.continue_greedy(out, inputs["attention_mask"], 5, stop_token_ids=[stop])
    assert free.shape == (2, 5)
    assert stopped[0].tolist() == [int(free[0, 0])] + [stop] * 4
    if stop not in free[1].tolist():
        assert torch.equal(stopped[1], free[1])


def test_a_reference_set_encoded_by_other_weights_is_not_reused(tiny_checkpoint, random_image):
    """The cache key holds the weights: the same model object changed in place (trained) encodes the
    references again and scores as whole prompts do with the new weights."""
    cached = Inspector.from_pretrained(tiny_checkpoint, batch_size=4)
    whole = Inspector(cached.model, cached.processor, batch_size=4, reference_cache_size=0)
    normals, queries = [random_image(), random_image()], [random_image(), random_image()]
    before = cached.inspect(queries, [normals] * 2)
    with torch.no_grad():
        cached.model.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    after, reference = cached.inspect(queries, [normals] * 2), whole.inspect(queries, [normals] * 2)
    assert len(cached._prefixes) == 2
    assert max(abs(a.score - b.score) for a, b in zip(after, reference)) < 1e-4
    assert max(abs(a.score - b.score) for a, b in zip(after, before)) > 1e-6
