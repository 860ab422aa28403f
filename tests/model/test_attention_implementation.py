"""flash-attention 2: chosen only where it can run, and given position ids that keep a pruned row one
sequence while its rotary positions stay those of the full sequence.

flash-attn cannot run here (no CUDA). What is tested: the choice of implementation, the position ids
the language model receives (the text row transformers' flash-attention path reads to detect packed
sequences, checked with transformers' own detection functions; the M-RoPE rows), and that sdpa
outputs do not change. The flash-attn kernels themselves are not run.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from iadgpt.model import detection_inputs, load_model
from iadgpt.model.checkpoint import attention_implementation


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint).eval()


@pytest.fixture()
def one_sample(tiny_processor, random_image):
    """One 3-shot sample: no padding, so flash-attention gets no mask and reads the text positions."""
    return detection_inputs(tiny_processor, [[random_image(), random_image(), random_image()]], [random_image()])


@pytest.fixture()
def padded_batch(tiny_processor, random_image):
    exemplars = [[random_image(), random_image()], [random_image(84), random_image()]]
    return detection_inputs(tiny_processor, exemplars, [random_image(), random_image(168)])


def language_model_calls(model, run):
    """The keyword arguments of every call of the language model while `run()` runs."""
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            result = run()
    finally:
        handle.remove()
    return calls, result


def full_sequence_positions(model, inputs):
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    return positions  # [3, B, L]


def assert_one_sequence_with_full_positions(call, inputs, keep, full_positions):
    positions = call["position_ids"]
    kept = int(keep[0].sum())
    assert positions.shape == (4, 1, kept) and not keep.all()  # pruned
    # The text row counts the kept tokens: transformers' flash-attention and mask code see one sequence.
    assert torch.equal(positions[0, 0], torch.arange(kept))
    assert not _is_packed_sequence(positions[0], batch_size=1)
    assert find_packed_sequence_indices(positions[0]) is None
    # The rotary rows are the full sequence's at the kept tokens: they jump where exemplar tokens were dropped.
    assert torch.equal(positions[1:, 0], full_positions[:, 0, keep[0]])
    # The kept tokens' own positions, which a text row taken from the full sequence would be, read as packed.
    assert _is_packed_sequence(torch.arange(inputs["input_ids"].shape[1])[keep[0]][None], batch_size=1)


def test_a_pruned_row_is_one_sequence_with_full_sequence_positions(model, one_sample):
    [call], out = language_model_calls(model, lambda: model(**one_sample))
    full_positions = full_sequence_positions(model, one_sample)
    assert_one_sequence_with_full_positions(call, one_sample, out.kept_tokens, full_positions)


def test_generate_prefill_gets_the_same_position_ids(model, one_sample):
    """generate() hands the model 4-row position ids whose text row is the full sequence's: the pruned
    prefill replaces it."""
    with torch.no_grad():
        keep = model(**one_sample).kept_tokens
    calls, _ = language_model_calls(model, lambda: model.generate(**one_sample, max_new_tokens=2, do_sample=False))
    assert len(calls) == 2  # the pruned prefill, then one cached step
    assert_one_sequence_with_full_positions(calls[0], one_sample, keep, full_sequence_positions(model, one_sample))


def test_sdpa_outputs_do_not_depend_on_the_text_row(model, padded_batch):
    [call], out = language_model_calls(model, lambda: model(**padded_batch))
    positions, mask = call["position_ids"], call["attention_mask"]
    assert positions.shape[0] == 4 and not out.kept_tokens.all()
    assert torch.equal(positions[0], ((mask.cumsum(-1) - 1) * mask))  # padding counts 0, as in generate()
    language_model = model.model.language_model
    with torch.no_grad():
        with_text = language_model(inputs_embeds=call["inputs_embeds"], attention_mask=mask, position_ids=positions)
        without = language_model(inputs_embeds=call["inputs_embeds"], attention_mask=mask, position_ids=positions[1:])
    assert torch.equal(with_text.last_hidden_state, without.last_hidden_state)


# -- which implementation ------------------------------------------------------------------------
def iadgpt_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("iadgpt") and r.levelno == logging.WARNING]


def test_other_implementations_are_kept(caplog):
    assert attention_implementation("sdpa", "cpu") == "sdpa"
    assert attention_implementation("eager", None) == "eager"
    assert not iadgpt_warnings(caplog)


@pytest.fixture()
def flash_attn_importable(tmp_path, monkeypatch):
    """A `flash_attn` package that import machinery finds (it is only looked up, never imported)."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_flash_attention_where_installed_and_on_cuda(flash_attn_importable, caplog):
    assert attention_implementation("flash_attention_2", "cuda:0") == "flash_attention_2"
    assert not iadgpt_warnings(caplog)
    assert attention_implementation("flash_attention_2", "cpu") == "sdpa"
    assert iadgpt_warnings(caplog) == ["attn_implementation flash_attention_2 is not available: it needs a CUDA "
                                       "device, not cpu; using sdpa instead."]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_without_flash_attn_the_model_loads_with_sdpa_and_one_warning(tiny_checkpoint, caplog):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    model = load_model(tiny_checkpoint, attn_implementation="flash_attention_2")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert iadgpt_warnings(caplog) == ["attn_implementation flash_attention_2 is not available: the flash_attn package "
                                       "is not installed (pip install 'iadgpt[gpu]'); using sdpa instead."]
