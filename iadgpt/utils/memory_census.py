"""What one training step holds in memory, counted from the tensors themselves (per process).

Two measurements that a memory planner (`iadgpt plan`) is checked against:

- `SavedActivations`: the bytes autograd keeps for backward during a forward pass (the activations),
  seen through `torch.autograd.graph.saved_tensors_hooks`.
- `training_state_census`: after a training step, the bytes of the weights, gradients, optimizer
  states and DeepSpeed's own buffers this process holds, plus every other live tensor, so that
  nothing held escapes the count (`unaccounted`).

Everything is counted in *storages*: a tensor that is a view holds its whole storage (a parameter
that is a slice of DeepSpeed's flat buffer holds the flat buffer, padding included), and a storage
counts once however many tensors (and parts) point into it.
"""

from __future__ import annotations

import gc
import heapq
import types
import weakref
from functools import partial
from collections import defaultdict
from typing import Any, Iterable, Iterator

import torch
from torch import nn

PARTS = ("weights", "module_buffers", "gradients", "optimizer", "buffers")
"""The parts of `training_state_census`, in the order a storage is claimed (first part wins)."""


def storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of the tensor's storage; None for storage-less tensors (meta, empty, sparse)."""
    if tensor.device.type == "meta" or tensor.is_sparse:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a storage
        return None
    if storage.nbytes() == 0:
        return None
    return str(tensor.device), storage.data_ptr()


def storage_nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def describe(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
            "storage_bytes": storage_nbytes(tensor)}


class StorageSet:
    """Unique storages with their bytes, the dtype, shape and a label of the first tensor seen on each."""

    def __init__(self):
        self.items: dict[tuple[str, int], dict] = {}

    def add(self, tensor: torch.Tensor, label: str = "") -> bool:
        """Record `tensor`'s storage; False when it has none or is already recorded."""
        key = storage_key(tensor)
        if key is None or key in self.items:
            return False
        self.items[key] = {**describe(tensor), "label": label}
        return True

    def __contains__(self, key) -> bool:
        return key in self.items

    @property
    def nbytes(self) -> int:
        return sum(item["storage_bytes"] for item in self.items.values())

    def by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for item in self.items.values():
            totals[item["dtype"]] += item["storage_bytes"]
        return dict(totals)

    def largest(self, count: int) -> list[dict]:
        return heapq.nlargest(count, self.items.values(), key=lambda item: item["storage_bytes"])


def parameter_storage_keys(parameters: Iterable[nn.Parameter]) -> set:
    """Storages that parameters hold now: their data (gathered or persistent under ZeRO-3, a view of a
    flat buffer under ZeRO-1/2) and, under ZeRO-3, their partition `ds_tensor`."""
    keys = set()
    for param in parameters:
        for tensor in (param, getattr(param, "ds_tensor", None)):
            if isinstance(tensor, torch.Tensor) and (key := storage_key(tensor)) is not None:
                keys.add(key)
    return keys


class _Packed:
    """A saved tensor as autograd holds it while our hooks are on: alive exactly as long as the graph
    node that saved it (a weak set of these is what the forward left for backward)."""

    __slots__ = ("tensor", "module", "__weakref__")

    def __init__(self, tensor: torch.Tensor, module: str):
        self.tensor, self.module = tensor, module


class SavedActivations:
    """Context manager around a forward pass: the bytes autograd holds for backward, parameters excluded.

        with SavedActivations(model) as saved:
            loss = model(**batch).loss
        saved.nbytes, saved.by_dtype(), saved.largest(5), saved.by_module(depth=3)

    Every tensor an autograd node saves goes through the pack hook, which hands autograd a small
    holder; when the forward ends (`__exit__`), the holders still alive are exactly the saved tensors
    that the graph keeps for backward (one dropped with a graph nobody holds, e.g. a checkpointed
    layer whose output needs no gradient, is not counted). A saved view holds its whole storage, so
    storages are counted once each, at `nbytes()`. Parameters are not activations: a tensor that is
    an `nn.Parameter`, has a `ds_id` (a ZeRO-3 parameter), is a view of one (the `weight.t()` that
    `addmm` saves has the parameter as `_base`), or lives in a storage a parameter holds (a ZeRO-1/2
    flat buffer; a ZeRO-3 parameter gathered for this forward) is left out.

    Gradient checkpointing: with the non-reentrant `torch.utils.checkpoint` (what training uses)
    the checkpointed function runs under the checkpoint's own saved-tensor hooks, which replace ours
    for its inside, so nothing saved inside a checkpointed layer is counted (it is recomputed in
    backward, outside this context). The checkpoint keeps the layer's *inputs* instead, saved before
    it enters its own hooks, so through ours: torch 2.13 does it in `_CheckpointFrame.save_inputs`
    with `torch._C._autograd._make_saved_tensor` (older torch through `_NoopSaveInputs`). So the count
    is what checkpointing retains (tests/utils/test_memory_census.py checks it on a Linear chain and
    on the model). The peak of a recomputation (one layer's activations during its backward) and
    autograd's temporaries are not counted.

    `model` (optional) adds forward hooks that remember which module was running when a tensor was
    saved (`by_module`; "" is the top-level forward, e.g. the losses). transformers 5 checkpoints a
    layer's `forward` inside its module hooks, so a checkpointed layer's saved inputs count under the
    layer itself; a tensor saved by another module's forward hook (the vision tower's layer fusion
    reading block outputs) counts under the module whose hook saved it.
    """

    def __init__(self, model: nn.Module | None = None, parameters: Iterable[nn.Parameter] | None = None,
                 exclude: Iterable[torch.Tensor] = ()):
        """`exclude`: tensors whose storages are not this forward's activations either, e.g. inputs a
        measured layer shares with the other layers of a model (the planner's per-layer probes)."""
        self.model = model
        self.exclude = list(exclude)
        self.parameters = list(parameters if parameters is not None else (model.parameters() if model else []))
        self.saved = StorageSet()
        self.packed_calls = 0
        self.retained_tensors = 0
        self._packed: weakref.WeakSet = weakref.WeakSet()
        self._module_stack: list[str] = []
        self._handles = []
        self._hooks = None
        self._zero3 = any(hasattr(p, "ds_id") for p in self.parameters)

    # -- hooks -----------------------------------------------------------------------------------
    def _is_parameter(self, tensor: torch.Tensor, key) -> bool:
        for candidate in (tensor, tensor._base):
            if isinstance(candidate, nn.Parameter) or hasattr(candidate, "ds_id"):
                return True
        if key in self._param_keys:
            return True
        # A ZeRO-3 parameter gathered for this forward holds a storage made after __enter__; the keys
        # are the storages parameters hold *now*: once released, an address may be reused by an
        # activation (the logits, say), which must then count.
        return self._zero3 and key in parameter_storage_keys(self.parameters)

    def _pack(self, tensor: torch.Tensor):
        self.packed_calls += 1
        key = storage_key(tensor)
        if key is None or self._is_parameter(tensor, key):
            return tensor
        packed = _Packed(tensor, self._module_stack[-1] if self._module_stack else "")
        self._packed.add(packed)
        return packed

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def _enter_module(self, name: str, _module, _args) -> None:
        self._module_stack.append(name)

    def _leave_module(self, _module, _args, _output) -> None:  # returns None: the output stays as it is
        self._module_stack.pop()

    def __enter__(self) -> "SavedActivations":
        self._param_keys = {storage_key(t) for t in self.exclude}
        if not self._zero3:  # fixed for the forward (ZeRO-3's are looked up at every save)
            self._param_keys |= parameter_storage_keys(self.parameters)
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(partial(self._enter_module, name)))
                self._handles.append(module.register_forward_hook(self._leave_module, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._module_stack.clear()
        alive = list(self._packed)
        self.retained_tensors = len(alive)
        for packed in alive:
            self.saved.add(packed.tensor, packed.module)

    # -- results (after the forward) -------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.saved.nbytes

    def by_dtype(self) -> dict[str, int]:
        return self.saved.by_dtype()

    def by_module(self, depth: int = 3) -> dict[str, int]:
        """Saved bytes per module name cut to its first `depth` dotted parts ("" = the top-level forward)."""
        totals: dict[str, int] = defaultdict(int)
        for item in self.saved.items.values():
            totals[".".join(item["label"].split(".")[:depth])] += item["storage_bytes"]
        return dict(totals)

    def largest(self, count: int = 8) -> list[dict]:
        return [{"module": item["label"], **{k: v for k, v in item.items() if k != "label"}}
                for item in self.saved.largest(count)]

    def summary(self, top: int = 8, depth: int = 3) -> dict:
        return {"bytes": self.nbytes, "storages": len(self.saved.items), "saved_tensors": self.retained_tensors,
                "packed_calls": self.packed_calls, "by_dtype": self.by_dtype(), "by_module": self.by_module(depth),
                "largest": self.largest(top)}


# -- the state after a step ------------------------------------------------------------------------
_LEAVES = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
           types.MethodType, types.BuiltinFunctionType)


def tensors_in(obj: Any, path: str = "", depth: int = 6, skip_modules: bool = False,
               _seen: set | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable from `obj` through attributes, dicts, lists and tuples,
    up to `depth` levels, a leaf tensor's `.grad` included; `skip_modules` does not enter nn.Modules
    (other than `obj` itself). `path` names the first route found to each tensor (for diagnosis)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        grad = obj.grad if obj.is_leaf else None
        if isinstance(grad, torch.Tensor):
            yield from tensors_in(grad, path + ".grad", depth, skip_modules, seen)
        return
    if depth <= 0 or isinstance(obj, _LEAVES) or (skip_modules and isinstance(obj, nn.Module) and _seen is not None):
        return
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            label = key if isinstance(key, (str, int)) else type(key).__name__
            if isinstance(key, torch.Tensor):
                yield from tensors_in(key, f"{path}[key]", depth - 1, skip_modules, seen)
            yield from tensors_in(value, f"{path}[{label}]", depth - 1, skip_modules, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for index, value in enumerate(list(obj)):
            yield from tensors_in(value, f"{path}[{index}]", depth - 1, skip_modules, seen)
    else:
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in list(attributes.items()):
                yield from tensors_in(value, f"{path}.{name}" if path else name, depth - 1, skip_modules, seen)


def live_tensors() -> Iterator[torch.Tensor]:
    """Every tensor object the garbage collector tracks (tensors referenced only from C++, e.g. inside
    a pending autograd graph, are not among them)."""
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                yield obj
        except ReferenceError:  # a dead weakref proxy
            continue


def holder_of(tensor: torch.Tensor, ignore: tuple = ()) -> str:
    """Best-effort name of what holds `tensor` ("Class.attribute", "closure of function", "list", ...),
    for diagnosis; containers in `ignore` (the caller's own) are skipped."""
    names = []
    skip = {id(x) for x in ignore}
    for ref in gc.get_referrers(tensor):
        if id(ref) in skip or isinstance(ref, types.FrameType):
            continue
        if isinstance(ref, dict):
            attribute = next((str(k) for k, v in ref.items() if v is tensor), "?")
            owners = [type(o).__name__ for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
            names.append(f"{owners[0]}.{attribute}" if owners else f"dict[{attribute}]")
        elif isinstance(ref, types.CellType):
            functions = [f.__qualname__ for closure in gc.get_referrers(ref) if isinstance(closure, tuple)
                         for f in gc.get_referrers(closure) if isinstance(f, types.FunctionType)]
            frames = [f"{o.f_code.co_qualname}" for o in gc.get_referrers(ref) if isinstance(o, types.FrameType)]
            names.append(f"closure of {functions[0]}" if functions else
                         f"variable of {frames[0]}" if frames else "cell (a running function's variable)")
        elif isinstance(ref, _Packed):
            names.append("autograd graph (saved for backward)")
        else:
            names.append(type(ref).__name__)
    return ", ".join(sorted(set(names))[:4]) or "no Python referrer"


def _deepspeed_parts(engine) -> tuple[Any, int | None]:
    """(the ZeRO optimizer, its stage) of a DeepSpeedEngine; (None, None) for anything else."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return None, None
    if not isinstance(engine, DeepSpeedEngine):
        return None, None
    return engine.optimizer, engine.zero_optimization_stage()


def base_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper (`AcceleratedOptimizer`, `DeepSpeedOptimizerWrapper`)
    and DeepSpeed's ZeRO optimizers, each of which holds the next one in `.optimizer`."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# Attributes of DeepSpeed's ZeRO optimizers whose tensors are gradients (partitions, accumulation buffers)
# or optimizer-owned master weights; anything else they hold counts as `buffers`.
_GRADIENT_ATTRIBUTES = ("averaged_gradients", "grads_in_partition", "all_grad_tensors", "grad_partitions_flat_buffer",
                        "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "grad_accum")
_MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def training_state_census(model, optimizer, accelerator=None, extra: dict[str, Any] | None = None,
                          top: int = 8) -> dict:
    """Bytes this process holds after a training step, from the tensors themselves, by part.

    model: the prepared model (a DeepSpeedEngine under DeepSpeed, else the module, possibly wrapped);
    optimizer: the prepared optimizer (accelerate's wrapper, a DeepSpeed ZeRO optimizer or a torch one);
    accelerator: used only to unwrap the model; extra: other named objects whose tensors are
    legitimately alive (the batch, the step's outputs), counted under their own names.

    Parts, each storage counted once, in the first part that claims it (order of `PARTS`):
      weights: the storages the parameters hold now: whole parameters without DeepSpeed; under
        ZeRO-1/2 the flat buffer(s) the trainable parameters are views of (padding included) plus the
        frozen parameters; under ZeRO-3 the partitions (`ds_tensor`, views of DeepSpeed's flat
        partition buffer) plus the parameters kept whole (`ds_persist`) and any still gathered.
      module_buffers: the modules' registered buffers (rotary inverse frequencies, ...).
      gradients: `p.grad` (no DeepSpeed), or the gradient tensors DeepSpeed keeps (the ZeRO-1/2
        `averaged_gradients` / contiguous `grads_in_partition`, the ZeRO-3 flat gradient partition
        buffer, the master partitions' `.grad`).
      optimizer: the torch optimizer's state (AdamW exp_avg, exp_avg_sq, step) and DeepSpeed's fp32
        master partitions where they are not the weights' own storage.
      buffers: every other tensor reachable from the DeepSpeed engine and its ZeRO optimizer (reduce
        buckets, ...); each with its attribute path in `buffers_largest`.
    total_live: unique storage bytes of every tensor the garbage collector sees, together with all
    the above; unaccounted = total_live - parts - extra, with the largest unaccounted storages.
    """
    engine = model
    zero_optimizer, zero_stage = _deepspeed_parts(engine)
    if zero_stage is not None:
        module = engine.module
    else:
        module = accelerator.unwrap_model(model) if accelerator is not None else model
    base = base_optimizer(optimizer)

    claimed: dict[str, StorageSet] = {part: StorageSet() for part in PARTS}
    owner: dict = {}

    def claim(part: str, tensor: torch.Tensor, label: str) -> None:
        key = storage_key(tensor)
        if key is None or key in owner:
            return
        owner[key] = part
        claimed[part].add(tensor, label)

    parameters = list(module.named_parameters())
    for name, param in parameters:
        ds_tensor = getattr(param, "ds_tensor", None)
        if isinstance(ds_tensor, torch.Tensor):
            claim("weights", ds_tensor, name + ".ds_tensor")
        claim("weights", param, name)
    for name, buffer in module.named_buffers():
        claim("module_buffers", buffer, name)
    for name, param in parameters:
        if param.grad is not None:
            claim("gradients", param.grad, name + ".grad")
    holders = []
    if zero_optimizer is not None:
        for attribute in _GRADIENT_ATTRIBUTES:
            for path, tensor in tensors_in(getattr(zero_optimizer, attribute, None), attribute):
                claim("gradients", tensor, path)
        for attribute in _MASTER_ATTRIBUTES:
            for index, master in enumerate(getattr(zero_optimizer, attribute, None) or []):
                if isinstance(master, torch.Tensor) and master.grad is not None:
                    claim("gradients", master.grad, f"{attribute}[{index}].grad")
        for name, param in parameters:
            for attribute in ("grad_accum",):
                value = getattr(param, attribute, None)
                if isinstance(value, torch.Tensor):
                    claim("gradients", value, f"{name}.{attribute}")
        for attribute in _MASTER_ATTRIBUTES:
            for path, tensor in tensors_in(getattr(zero_optimizer, attribute, None), attribute, depth=2):
                claim("optimizer", tensor, path)
        holders = [("zero_optimizer", zero_optimizer), ("engine", engine)]
    for state in getattr(base, "state", {}).values():  # every parameter's, whatever param_groups hold now
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                claim("optimizer", value, f"state.{key}")
    for holder_name, holder in holders:  # the model's own tensors are claimed above: not entered again
        for path, tensor in tensors_in(holder, holder_name, skip_modules=True):
            claim("buffers", tensor, path)

    extra_sets = {}
    for name, obj in (extra or {}).items():
        extra_sets[name] = StorageSet()
        for path, tensor in tensors_in(obj, name):
            key = storage_key(tensor)
            if key is not None and key not in owner:
                owner[key] = name
                extra_sets[name].add(tensor, path)

    every = StorageSet()
    for key, part in owner.items():  # what the parts found, whether gc tracks those tensors or not
        every.items[key] = (claimed.get(part) or extra_sets[part]).items[key]
    unaccounted, examples = StorageSet(), {}
    for tensor in live_tensors():
        key = storage_key(tensor)
        if key is not None and key not in every:
            every.add(tensor, "unaccounted")
            unaccounted.add(tensor, "")
            examples[key] = tensor
    for key, _ in heapq.nlargest(top, unaccounted.items.items(), key=lambda kv: kv[1]["storage_bytes"]):
        unaccounted.items[key]["label"] = holder_of(examples[key], ignore=(examples,))
    examples.clear()
    parts = {part: claimed[part].nbytes for part in PARTS}
    from ..training.trainer import parameter_counts

    total, trainable = parameter_counts(module)
    return {
        "zero_stage": zero_stage or 0,
        "parameters": {"total": total, "trainable": trainable, "frozen": total - trainable,
                       "dtype": str(next(module.parameters()).dtype).removeprefix("torch.")},
        "parts": parts,
        "parts_by_dtype": {part: claimed[part].by_dtype() for part in PARTS},
        "extra": {name: found.nbytes for name, found in extra_sets.items()},
        "total_live": every.nbytes,
        "unaccounted": unaccounted.nbytes,
        "unaccounted_largest": [{"held_by": item["label"], **{k: v for k, v in item.items() if k != "label"}}
                                for item in unaccounted.largest(top)],
        "storages": {part: _listing(claimed[part], top) for part in PARTS},
    }


def _listing(found: StorageSet, top: int) -> list[dict]:
    return [dict(item) for item in found.largest(top)]
