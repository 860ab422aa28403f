"""The IADGPT model core on a tiny random-weight Qwen2.5-VL of the real architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from iadgpt.model import (
    ROLE_EXEMPLAR,
    ROLE_OTHER,
    ROLE_QUERY,
    IADGPTForConditionalGeneration,
    detection_inputs,
    few_shot_messages,
    init_model,
    load_model,
    load_processor,
)
from iadgpt.model.losses import dice_loss, focal_loss
from iadgpt.model.settings import IADGPTSettings

QWEN_FORWARD = Qwen2_5_VLForConditionalGeneration.forward  # the unmodified Qwen2.5-VL forward


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint).eval()


@pytest.fixture()
def batch(tiny_processor, random_image):
    """Two 3-shot samples of different image sizes, so the batch is left-padded."""
    exemplars = [[random_image(), random_image(), random_image()], [random_image(84), random_image(), random_image()]]
    return detection_inputs(tiny_processor, exemplars, [random_image(), random_image(168)])


def full_positions(model, inputs):
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    return position_ids


# -- the checkpoint ------------------------------------------------------------------------------
def test_init_model_writes_a_real_qwen2_5_vl_checkpoint(tiny_checkpoint, tiny_processor):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert (tiny_checkpoint / "model.safetensors").is_file()
    assert not list(tiny_checkpoint.glob("*.bin"))
    # Saved as a stock Qwen2.5-VL processor, so AutoProcessor loads it where torchvision works.
    processor_config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert {"image_processor", "video_processor"} <= set(processor_config)
    # The stock transformers class loads it: same architecture, nothing custom needed.
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert sum(p.numel() for p in plain.parameters()) < 1_000_000
    tok = tiny_processor.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    for word in ("Yes", "No", " defect", " anomaly", " normal"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    text = tiny_processor.apply_chat_template(few_shot_messages(1, "Is there any defect?"), tokenize=False,
                                              add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|im_start|>assistant\n")


def test_init_model_is_deterministic_and_small_preset_is_bigger(tmp_path):
    a = init_model(tmp_path / "a", "tiny", seed=3)
    b = init_model(tmp_path / "b", "tiny", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    small = init_model(tmp_path / "s", "small")
    n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration.from_pretrained(small).parameters())
    assert 1_000_000 < n < 10_000_000


def test_bad_preset_and_bad_folders_are_named(tmp_path):
    with pytest.raises(ValueError,
                       match=r"Unknown preset 'huge'; allowed: \['qwen2\.5-vl-32b', 'qwen2\.5-vl-3b', 'qwen2\.5-vl-72b', 'qwen2\.5-vl-7b', 'small', 'tiny'\]"):
        init_model(tmp_path / "x", "huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_processor(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="holds a 'bert' model; iadgpt needs a Qwen2.5-VL checkpoint"):
        load_model(tmp_path / "bert")


def test_settings_errors_name_the_value_and_what_is_allowed(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"vision_fusion_layers=\[2, 9\]: \[9\] not in 1..4"):
        load_model(tiny_checkpoint, iadgpt={"vision_fusion_layers": [2, 9]})
    with pytest.raises(ValueError, match=r"attention_map_layers=\[0\]: \[0\] not in 1..2"):
        load_model(tiny_checkpoint, iadgpt={"attention_map_layers": [0]})
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"exemplar_retention={bad} is outside \(0, 1\]"):
            IADGPTSettings(exemplar_retention=bad)
    with pytest.raises(ValueError, match=r"Unknown IADGPT settings \['retention'\]"):
        IADGPTSettings.from_dict({"retention": 0.5})


def test_plain_qwen_checkpoint_gets_paper_layers_and_initialised_fusion(tmp_path, tiny_checkpoint):
    config = Qwen2_5_VLConfig.from_pretrained(tiny_checkpoint)
    del config.iadgpt
    plain = Qwen2_5_VLForConditionalGeneration(config)
    plain.save_pretrained(tmp_path / "plain")
    model = IADGPTForConditionalGeneration.from_pretrained(tmp_path / "plain")
    assert model.iadgpt.vision_fusion_layers == [1, 2, 3, 4]
    assert model.iadgpt.attention_map_layers == [1, 2]
    assert torch.equal(model.model.visual.layer_fusion.logits.detach(), torch.zeros(4))
    # 7B depths give the paper's layers.
    paper = IADGPTSettings().resolved(vision_depth=32, text_depth=28)
    assert paper.vision_fusion_layers == [8, 16, 24, 32] and paper.attention_map_layers == [7, 14, 21, 28]


# -- exemplar compression ------------------------------------------------------------------------
def test_compressed_forward_equals_full_forward_with_dropped_tokens_masked(model, batch):
    with torch.no_grad():
        out = model(**batch)
        keep = out.kept_tokens
        reference = QWEN_FORWARD(model, **{k: v for k, v in batch.items() if k != "attention_mask"},
                                 attention_mask=batch["attention_mask"] * keep,
                                 position_ids=full_positions(model, batch))
    # 3 exemplars of 16 tokens: the reference keeps 16, the two others floor(0.2 * 16) = 3 each.
    image_pad = model.config.image_token_id
    dropped = ((batch["input_ids"] == image_pad) & ~keep).sum(-1)
    assert dropped[0].item() == 2 * (16 - 3)
    seen = batch["attention_mask"].bool() & keep
    for b in range(2):
        n = int(seen[b].sum())
        torch.testing.assert_close(out.logits[b, -n:], reference.logits[b][seen[b]], atol=1e-5, rtol=1e-4)
    # And it really differs from not compressing.
    with torch.no_grad():
        uncompressed = model(**batch, compress_exemplars=False)
    assert uncompressed.kept_tokens is None
    assert (uncompressed.logits[:, -1] - out.logits[:, -1]).abs().max() > 1e-6


def test_compression_keeps_the_least_redundant_tokens():
    from iadgpt.model import compress_exemplar_tokens

    reference = torch.eye(4)  # four orthogonal tokens
    other = torch.stack([torch.eye(4)[0], torch.tensor([1.0, 1, 0, 0]), torch.tensor([0.0, 0, 0, 0]) + 0.1,
                         torch.tensor([-1.0, -1, -1, -1])])
    keep = compress_exemplar_tokens([reference, other], retention=0.5)
    assert keep[0].all()
    # max cosine similarities to the reference: 1.0, 0.707, 0.5, -0.5 -> keep the last two.
    assert keep[1].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="needs at least one normal exemplar"):
        compress_exemplar_tokens([], retention=0.2)
    with pytest.raises(ValueError, match=r"retention=1.2 is outside \(0, 1\]"):
        compress_exemplar_tokens([reference, other], retention=1.2)


def test_query_and_other_images_are_never_compressed(model, batch):
    n_images = batch["image_grid_thw"].shape[0]
    roles = torch.tensor([ROLE_EXEMPLAR, ROLE_OTHER, ROLE_EXEMPLAR, ROLE_QUERY] * (n_images // 4))
    with torch.no_grad():
        out = model(**batch, image_roles=roles)
    spans = [(i, (batch["input_ids"][i] == model.config.image_token_id).nonzero().flatten()) for i in range(2)]
    for b, positions in spans:
        images = positions.split(16)  # four 16-token images in sample 0
        if b == 0:
            kept = [out.kept_tokens[b, p].sum().item() for p in images]
            assert kept == [16, 16, 3, 16]


def test_compression_without_exemplars_is_an_error_only_when_asked_for(model, tiny_processor, random_image):
    inputs = detection_inputs(tiny_processor, [[]], [random_image()])
    with torch.no_grad():
        model(**inputs)  # settings say compress, but a 0-shot sample simply has nothing to compress
    with pytest.raises(ValueError, match="no normal exemplar image before its query image"):
        model(**inputs, compress_exemplars=True)


def test_generation_with_compression_matches_step_by_step_forward(model, tiny_processor, random_image):
    """Every decoding step's logits, not only the tokens: the compacted cache of a left-padded batch
    needs its own attention mask at every step (generate() passes the cache as `cache=`). 4 and 2
    exemplars: compression drops more tokens of the longer sample, so the padding moves."""
    exemplars = [[random_image() for _ in range(4)], [random_image(), random_image()]]
    batch = detection_inputs(tiny_processor, exemplars, [random_image(), random_image()])
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for step_logits in generated.logits:
            step = {**batch, "input_ids": ids, "attention_mask": mask,
                    "mm_token_type_ids": torch.nn.functional.pad(batch["mm_token_type_ids"], (0, ids.shape[1] - batch["input_ids"].shape[1]))}
            logits = model(**step, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, logits, atol=1e-5, rtol=1e-5)
            next_id = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
            mask = torch.cat([mask, torch.ones_like(next_id)], 1)
    assert torch.equal(generated.sequences, ids)


# -- image score ---------------------------------------------------------------------------------
def test_image_score_equals_first_generation_step(model, batch):
    yes, no = model.yes_no_token_ids
    with torch.no_grad():
        out = model(**batch, logits_to_keep=1)
        score = model.image_anomaly_score(out.logits[:, -1])
        gen = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    expected = gen.logits[0][:, [yes, no]].float().softmax(-1)[:, 0]  # "Yes" means defective
    torch.testing.assert_close(score, expected, atol=1e-6, rtol=1e-5)
    assert ((score > 0) & (score < 1)).all()


def test_batched_scoring_equals_one_by_one(model, tiny_processor, random_image):
    exemplars = [[random_image(), random_image()], [random_image(140), random_image(84)]]
    queries = [random_image(), random_image(112, 168)]
    with torch.no_grad():
        batched = model.image_anomaly_score(model(**detection_inputs(tiny_processor, exemplars, queries),
                                                  logits_to_keep=1).logits[:, -1])
        single = torch.cat([model.image_anomaly_score(model(**detection_inputs(tiny_processor, [e], [q]),
                                                            logits_to_keep=1).logits[:, -1])
                            for e, q in zip(exemplars, queries)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_defect_answer_no_flips_the_score(tiny_checkpoint, batch):
    yes_model = load_model(tiny_checkpoint).eval()
    no_model = load_model(tiny_checkpoint, iadgpt={"detection_question": {"text": "Is the query image normal?",
                                                                         "defect_answer": "No"}}).eval()
    with torch.no_grad():
        logits = yes_model(**batch, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(yes_model.image_anomaly_score(logits) + no_model.image_anomaly_score(logits),
                               torch.ones(2))


def test_image_score_fuses_the_answer_with_the_map_maximum(tiny_checkpoint, batch):
    """residuals.image_score_map_weight a: sigmoid((1 - a) logit(p) + a logit(max map)), from the same forward's
    answer probability p (a = 0) and maps; a = 1 is the map's maximum; the maps are required."""
    answer_only = load_model(tiny_checkpoint).eval()
    with torch.no_grad():
        out = answer_only(**batch, pixel_maps=True, logits_to_keep=1)
    answer = answer_only.image_anomaly_score(out.logits[:, -1])
    peaks = torch.stack([m.max() for m in out.pixel_scores])
    assert not torch.allclose(answer, peaks, atol=1e-3)  # the two parts differ, so the mix is visible
    for weight in (0.5, 1.0):
        fused = load_model(tiny_checkpoint, iadgpt={"residuals": {"image_score_map_weight": weight}}).eval()
        expected = torch.sigmoid((1 - weight) * torch.log(answer / (1 - answer)) + weight * torch.log(peaks / (1 - peaks)))
        torch.testing.assert_close(fused.image_anomaly_score(out.logits[:, -1], out.pixel_scores), expected,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"residuals.image_score_map_weight=1.0 fuses .* call the model with pixel_maps=True"):
        fused.image_anomaly_score(out.logits[:, -1])
    with pytest.raises(ValueError, match=r"residuals.image_score_map_weight=1.5 is outside \[0, 1\]"):
        IADGPTSettings.from_dict({"residuals": {"image_score_map_weight": 1.5}})


# -- pixel maps ----------------------------------------------------------------------------------
def eager_reference_maps(tiny_checkpoint, inputs, keep=None):
    """Mean attention of the anomaly words to the query tokens from eager `output_attentions`."""
    eager = load_model(tiny_checkpoint, attn_implementation="eager").eval()
    mask = inputs["attention_mask"] if keep is None else inputs["attention_mask"] * keep
    with torch.no_grad():
        out = QWEN_FORWARD(eager, **{k: v for k, v in inputs.items() if k != "attention_mask"}, attention_mask=mask,
                           position_ids=full_positions(eager, inputs), output_attentions=True)
    tok_ids = {eager.word_token_ids["anomaly"][i][-1] for i in range(len(eager.word_token_ids["anomaly"]))
               if len(eager.word_token_ids["anomaly"][i]) == 1}
    maps = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b]
        image_positions = (ids == eager.config.image_token_id).nonzero().flatten()
        query = image_positions[-len(image_positions) // 4:] if False else None
        # the query is the last image: its tokens are the last contiguous run
        runs = torch.split(image_positions, torch.diff(image_positions, prepend=image_positions[:1] - 1).ne(1)
                           .cumsum(0).bincount().tolist())
        query = runs[-1]
        rows = [i for i in range(int(query[-1]) + 1, len(ids)) if int(ids[i]) in tok_ids]
        assert rows, "the question must hold an anomaly word"
        per_layer = [out.attentions[n - 1][b][:, rows][:, :, query].mean(dim=(0, 1))
                     for n in eager.iadgpt.attention_map_layers]
        maps.append(torch.stack(per_layer).mean(0))
    return maps


def test_attention_rows_equal_eager_attention(model, tiny_checkpoint, batch):
    with torch.no_grad():
        out = model(**batch, pixel_maps=True, compress_exemplars=False)
    for ours, ref in zip(out.anomaly_maps, eager_reference_maps(tiny_checkpoint, batch)):
        torch.testing.assert_close(ours.flatten(), ref, atol=1e-6, rtol=1e-5)
    assert [tuple(m.shape) for m in out.anomaly_maps] == [(4, 4), (6, 6)]


def test_attention_rows_with_compression_equal_eager_with_masked_keys(model, tiny_checkpoint, batch):
    with torch.no_grad():
        out = model(**batch, pixel_maps=True)
    for ours, ref in zip(out.anomaly_maps, eager_reference_maps(tiny_checkpoint, batch, keep=out.kept_tokens)):
        torch.testing.assert_close(ours.flatten(), ref, atol=1e-6, rtol=1e-5)


def test_prompt_without_anomaly_word_is_an_error(model, tiny_processor, random_image):
    messages = few_shot_messages(1, "Describe the query image.")
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tiny_processor(text=[text], images=[random_image(), random_image()], return_tensors="pt")
    with pytest.raises(ValueError, match=r"no anomaly word after the query image.*\['defect', 'defective'"):
        model(**inputs, pixel_maps=True)


# -- losses and training mechanics ---------------------------------------------------------------
def test_focal_and_dice_match_hand_computed_values():
    prob = torch.tensor([0.9, 0.2, 0.6, 0.1])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # focal, gamma 2: -(1-p_t)^2 log p_t with p_t = 0.9, 0.8, 0.6, 0.9
    import math
    expected = -(0.01 * math.log(0.9) + 0.04 * math.log(0.8) + 0.16 * math.log(0.6) + 0.01 * math.log(0.9)) / 4
    assert focal_loss(prob, mask, gamma=2.0).item() == pytest.approx(expected, rel=1e-5)
    # alpha 0.25 weighs positives by 0.25 and negatives by 0.75
    weighted = -(0.25 * 0.01 * math.log(0.9) + 0.75 * 0.04 * math.log(0.8) + 0.25 * 0.16 * math.log(0.6)
                 + 0.75 * 0.01 * math.log(0.9)) / 4
    assert focal_loss(prob, mask, gamma=2.0, alpha=0.25).item() == pytest.approx(weighted, rel=1e-5)
    # dice: 1 - (2 * 1.5 + 1) / (1.8 + 2 + 1)
    assert dice_loss(prob, mask).item() == pytest.approx(1 - 4.0 / 4.8, rel=1e-6)


def test_pixel_loss_is_added_and_skipped_for_samples_without_mask(tiny_checkpoint, tiny_processor, random_image):
    model = load_model(tiny_checkpoint, iadgpt={"pixel_loss_weight": 0.5})
    messages = few_shot_messages(2, model.iadgpt.detection_question.text, answer="Yes")
    text = tiny_processor.apply_chat_template(messages, tokenize=False)
    tiny_processor.tokenizer.padding_side = "right"
    inputs = tiny_processor(text=[text, text], images=[random_image() for _ in range(6)], return_tensors="pt",
                            padding=True)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100  # supervise the answer only
    defect = torch.zeros(112, 112)
    defect[20:50, 30:70] = 1
    out = model(**inputs, labels=labels, pixel_masks=[defect, None])
    prob = torch.nn.functional.interpolate(out.pixel_scores[0][None, None], size=(112, 112), mode="bilinear")[0, 0]
    torch.testing.assert_close(out.focal_loss, focal_loss(prob, defect))
    torch.testing.assert_close(out.dice_loss, dice_loss(prob, defect))
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * (out.focal_loss + out.dice_loss))
    out.loss.backward()
    q_grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0
    no_mask = model(**inputs, labels=labels, pixel_masks=[None, None])
    assert no_mask.focal_loss is None and torch.equal(no_mask.loss, no_mask.lm_loss)


def test_score_loss_is_the_yes_no_cross_entropy_at_the_first_answer_token(tiny_checkpoint, tiny_processor,
                                                                          random_image):
    model = load_model(tiny_checkpoint, iadgpt={"score_loss_weight": 0.5})
    question = model.iadgpt.detection_question.text
    answers = ["Yes, the query image has a scratch defect.", "No, the query image is normal.", "A grey hex nut."]
    texts = [tiny_processor.apply_chat_template(few_shot_messages(1, question, answer=a), tokenize=False)
             for a in answers]
    tiny_processor.tokenizer.padding_side = "right"
    inputs = tiny_processor(text=texts, images=[random_image() for _ in range(6)], return_tensors="pt", padding=True)
    prefix = tiny_processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    labels = torch.full_like(inputs["input_ids"], -100)
    starts = []
    for b, row in enumerate(inputs["input_ids"].tolist()):
        start = next(i + len(prefix) for i in range(len(row)) if row[i:i + len(prefix)] == prefix)
        end = start + row[start:].index(tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        labels[b, start:end + 1] = inputs["input_ids"][b, start:end + 1]
        starts.append(start)
    out = model(**inputs, labels=labels)

    yes, no = model.yes_no_token_ids
    pairs = torch.stack([out.logits[b, starts[b] - 1, [yes, no]] for b in (0, 1)]).float()
    expected = -(pairs.log_softmax(-1)[0, 0] + pairs.log_softmax(-1)[1, 1]) / 2  # the caption has no decision
    torch.testing.assert_close(out.score_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * expected)
    out.loss.backward()
    stock_path = model(**inputs, labels=labels, compress_exemplars=False)  # Qwen's own forward, 1 shot: same
    torch.testing.assert_close(stock_path.score_loss, out.score_loss)
    torch.testing.assert_close(stock_path.loss, out.loss)

    plain = load_model(tiny_checkpoint)(**inputs, labels=labels)
    assert plain.score_loss is None and torch.equal(plain.loss, plain.lm_loss)
    captions_only = model(**{k: v[2:] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")},
                          pixel_values=inputs["pixel_values"][inputs["pixel_values"].shape[0] * 2 // 3:],
                          image_grid_thw=inputs["image_grid_thw"][4:], labels=labels[2:])
    assert captions_only.score_loss.item() == 0.0 and torch.equal(captions_only.loss, captions_only.lm_loss)


def test_fusion_weights_get_gradients_change_outputs_and_survive_save_load(tiny_checkpoint, tmp_path, batch):
    model = load_model(tiny_checkpoint)
    fusion = model.model.visual.layer_fusion
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    assert fusion.logits.grad is not None and fusion.logits.grad.abs().sum() > 0
    with torch.no_grad():
        before = model(**batch).logits
        fusion.logits.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0]))
        after = model(**batch).logits
    assert (before - after).abs().max() > 1e-6
    model.save_pretrained(tmp_path / "saved")
    tiny_processor = load_processor(tiny_checkpoint)
    tiny_processor.save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved").eval()
    assert torch.equal(reloaded.model.visual.layer_fusion.logits.detach(), torch.tensor([2.0, -1.0, 0.5, 0.0]))
    model.eval()
    with torch.no_grad():
        a, b = model(**batch, pixel_maps=True), reloaded(**batch, pixel_maps=True)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.pixel_scores, b.pixel_scores):
        assert torch.equal(x, y)


def test_fusion_can_start_near_the_last_layer(tiny_checkpoint):
    model = load_model(tiny_checkpoint, iadgpt={"fusion_init_last_weight": 0.85})
    model.model.visual.layer_fusion.logits.data.copy_(model.model.visual.layer_fusion.initial_logits())
    weights = model.model.visual.layer_fusion.layer_weights()
    torch.testing.assert_close(weights, torch.tensor([0.05, 0.05, 0.05, 0.85]))


def test_maps_only_for_samples_with_masks_so_batches_can_mix_tasks(tiny_checkpoint, tiny_processor, random_image):
    model = load_model(tiny_checkpoint)
    detection = tiny_processor.apply_chat_template(
        few_shot_messages(1, model.iadgpt.detection_question.text, answer="No"), tokenize=False)
    caption = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this product."}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A metal nut."}]}], tokenize=False)
    tiny_processor.tokenizer.padding_side = "right"
    inputs = tiny_processor(text=[detection, caption], images=[random_image(), random_image(), random_image()],
                            return_tensors="pt", padding=True)
    out = model(**inputs, pixel_masks=[torch.zeros(112, 112), None])
    assert out.pixel_scores[1] is None and out.pixel_scores[0].shape == (4, 4)
    assert out.focal_loss is not None and torch.equal(out.loss, out.focal_loss + out.dice_loss)


def test_dummy_image_runs_the_vision_tower_without_changing_the_loss(tiny_checkpoint, tiny_processor, random_image):
    model = load_model(tiny_checkpoint).train()  # the dummy image is for training batches without images
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What is a scratch?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A thin line of damage."}]}], tokenize=False)
    inputs = tiny_processor(text=[text], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    dummy = tiny_processor.image_processor(images=[random_image(56)], return_tensors="pt")
    plain = model(**inputs, labels=labels)
    with_dummy = model(**inputs, labels=labels, dummy_pixel_values=dummy["pixel_values"],
                       dummy_image_grid_thw=dummy["image_grid_thw"])
    torch.testing.assert_close(plain.loss, with_dummy.loss)
    with_dummy.loss.backward()
    patch_grad = model.model.visual.patch_embed.proj.weight.grad
    assert patch_grad is not None and torch.count_nonzero(patch_grad) == 0
