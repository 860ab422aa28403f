"""The memory census of a training step: saved activations and the state after a step, each checked
against a computation from the tensors themselves; and the launchable worker under ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from iadgpt.model import detection_inputs, load_model, load_processor
from iadgpt.training.trainer import enable_gradient_checkpointing, freeze_vision_encoder
from iadgpt.utils.memory_census import SavedActivations, training_state_census


def linear_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))


def test_saved_activations_of_a_linear_chain_are_the_hand_computed_bytes():
    """Linear 1 keeps its input (for its weight's gradient), ReLU its output, which Linear 2 keeps too
    (one storage); the weights Linear 2 keeps (`weight.t()`, a view of a parameter) are no activation.
    The input is a view of a larger tensor: it holds, and counts, its whole storage."""
    chain = linear_chain()
    storage = torch.randn(10, 16)
    x = storage[:5]
    with SavedActivations(chain) as saved:
        chain(x).sum()
    assert saved.nbytes == 10 * 16 * 4 + 5 * 64 * 4
    assert saved.by_dtype() == {"float32": saved.nbytes}
    assert saved.by_module(depth=1) == {"0": 10 * 16 * 4, "1": 5 * 64 * 4}
    assert saved.largest(2) == [{"module": "1", "shape": [5, 64], "dtype": "float32", "storage_bytes": 5 * 64 * 4},
                                {"module": "0", "shape": [5, 16], "dtype": "float32", "storage_bytes": 10 * 16 * 4}]


def test_checkpointing_keeps_only_the_inputs_and_a_dropped_graph_keeps_nothing():
    chain = linear_chain()
    x = torch.randn(5, 16, requires_grad=True)
    with SavedActivations(chain) as saved:
        out = checkpoint(chain, x, use_reentrant=False)
    assert saved.nbytes == 5 * 16 * 4 and saved.retained_tensors == 1
    out.sum().backward()  # the recomputation runs outside the context and uses what was kept
    assert x.grad is not None and chain[0].weight.grad is not None

    # Nothing needs a gradient: the checkpoint still hands its input to the hook, but no graph keeps it.
    chain.requires_grad_(False)
    with SavedActivations(chain) as saved:
        checkpoint(chain, torch.randn(5, 16), use_reentrant=False)
    assert saved.packed_calls == 1 and saved.nbytes == 0


@pytest.fixture()
def tiny_batch(tiny_checkpoint, tiny_processor, random_image):
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    return {**inputs, "labels": inputs["input_ids"].clone()}


def test_census_without_deepspeed_equals_the_parameters_gradients_and_adamw_states(tiny_checkpoint, tiny_batch):
    model = load_model(tiny_checkpoint, dtype=torch.float32).train()
    freeze_vision_encoder(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
    for _ in range(2):  # step 1 makes the AdamW states; at step 2 weights, gradients and states all exist
        optimizer.zero_grad()
        output = model(**tiny_batch)
        output.loss.backward()
        if _ == 0:
            optimizer.step()
    census = training_state_census(model, optimizer, extra={"batch": tiny_batch, "outputs": output})

    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in trainable)
    assert census["parameters"] == {"total": total, "trainable": count, "frozen": total - count, "dtype": "float32"}
    parts = census["parts"]
    assert parts["weights"] == 4 * total
    assert parts["gradients"] == 4 * count
    assert parts["optimizer"] == 2 * 4 * count + 4 * len(trainable)  # exp_avg, exp_avg_sq, a float32 step each
    assert parts["module_buffers"] == sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert parts["buffers"] == 0
    batch_bytes = sum(v.untyped_storage().nbytes() for v in tiny_batch.values() if isinstance(v, torch.Tensor))
    assert census["extra"]["batch"] == batch_bytes
    assert census["total_live"] == sum(parts.values()) + sum(census["extra"].values()) + census["unaccounted"]


def language_layer_names(model) -> list[str]:
    return [f"model.language_model.layers.{i}" for i in range(len(model.model.language_model.layers))]


def test_gradient_checkpointing_keeps_the_layer_inputs_and_far_less(tiny_checkpoint, tiny_batch):
    model = load_model(tiny_checkpoint, dtype=torch.float32).train()
    hidden = model.config.text_config.hidden_size
    with SavedActivations(model) as full:
        loss = model(**tiny_batch).loss
    loss.backward()  # after the count: backward frees what it used
    enable_gradient_checkpointing(model)
    with SavedActivations(model) as kept:
        output = model(**tiny_batch)
    output.loss.backward()
    assert kept.nbytes < full.nbytes / 2, (kept.nbytes, full.nbytes)
    lm_tokens = int(output.kept_tokens.sum()) if output.kept_tokens is not None else tiny_batch["input_ids"].shape[1]
    by_layer = kept.by_module(depth=4)
    for name in language_layer_names(model):
        # each checkpointed layer keeps its input hidden states, [1, tokens the LM ran on, hidden]
        inputs = [item for item in kept.saved.items.values()
                  if item["label"] == name and item["shape"] == [1, lm_tokens, hidden]]
        assert inputs and by_layer[name] >= lm_tokens * hidden * 4, (name, by_layer.get(name))


def test_a_frozen_vision_tower_keeps_no_activations(tiny_checkpoint, tiny_batch):
    """A frozen tower keeps nothing for backward, checkpointed or not, as the recipe sets it up.

    transformers' gradient_checkpointing_enable also calls enable_input_require_grads, whose forward
    hook makes the output of *every* sub-model's input embeddings require a gradient, the vision
    tower's patch_embed included: then a frozen tower keeps its activations (the checkpointed blocks'
    inputs) and backward runs through it. The recipe's `enable_gradient_checkpointing` removes the hooks."""
    model = load_model(tiny_checkpoint, dtype=torch.float32).train()
    freeze_vision_encoder(model, keep_merger=False)
    with SavedActivations(model) as plain:
        model(**tiny_batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with SavedActivations(model) as hooked:
        model(**tiny_batch)
    model.disable_input_require_grads()  # a second enable would not see (and not remove) these hooks
    model.gradient_checkpointing_disable()
    enable_gradient_checkpointing(model)
    with SavedActivations(model) as checkpointed:
        model(**tiny_batch)
    for saved in (plain, checkpointed):
        assert saved.nbytes > 0
        assert not [name for name in saved.by_module(depth=2) if name.startswith("model.visual")], saved.by_module(2)
    blocks = len(model.model.visual.blocks)
    assert {f"model.visual.blocks.{i}" for i in range(blocks)} <= set(hooked.by_module(depth=4))

    freeze_vision_encoder(model, keep_merger=True)  # the merger (and fusion) train: they keep their inputs
    with SavedActivations(model) as merger_trains:
        model(**tiny_batch)
    assert "model.visual.merger" in merger_trains.by_module(depth=3)


@pytest.mark.slow
def test_the_plan_step_worker_under_zero3_accounts_for_what_each_rank_holds(zero3_step_census):
    """Two CPU processes under ZeRO-3 (the shipped stage-3 settings): every rank holds its half of the
    partitioned state, and almost every live tensor belongs to a part, the batch or the outputs."""
    ranks = zero3_step_census["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["zero_stage"] == 3 for r in ranks)
    for name in ("census_backward_end", "census_before_optimizer_step", "census_after_backward"):
        censuses = [r[name] for r in ranks]
        # the partitioned state is the same size on both ranks
        for part in ("gradients", "optimizer"):
            assert censuses[0]["parts"][part] == censuses[1]["parts"][part], (name, part)
        for census in censuses:
            assert census["total_live"] == (sum(census["parts"].values()) + sum(census["extra"].values())
                                            + census["unaccounted"])
            assert census["unaccounted"] < 0.1 * census["total_live"], census["unaccounted_largest"]
    before = [r["census_before_optimizer_step"] for r in ranks]
    trainable = before[0]["parameters"]["trainable"]
    for census in before:
        # fp32: gradient partition + master partition + two AdamW moments, each trainable / 2 (padded)
        assert census["parts"]["optimizer"] >= 3 * 4 * trainable // 2
        assert census["parts"]["optimizer"] < 3 * 4 * trainable // 2 + 4096
    for r in ranks:
        assert r["activations"]["bytes"] > 0
        assert r["batch"]["lm_sequence_length"] <= r["batch"]["input_ids_length"]
        assert r["batch"]["labels"] > 0
