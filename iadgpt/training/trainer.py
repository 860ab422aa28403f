"""The pieces of the training recipe: accelerator, model, data, optimizer, checkpoints, logging.

`train/train.py` strings them together; this module keeps each piece small and testable. Runs are
launched with `accelerate launch` (DeepSpeed ZeRO-2/3 on GPUs, or 2 CPU processes over gloo in the
tests); nothing here is a home-made distributed layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list
from torch.utils.data import DataLoader, Dataset

from ..data.records import StageInfo, TrainingRecord, read_records
from ..data.tasks import ResizeRule
from ..model.checkpoint import check_checkpoint, load_model, load_processor
from ..utils.digests import file_sha256
from .collator import RecordCollator, record_length
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint_manifest.json"
"""SHA-256 of every file of a checkpoint folder, written when it is saved and checked before it is loaded."""


class TrainingSetupError(ValueError):
    """Something is wrong before any heavy work: a path, a record, the launch configuration."""


# -- accelerator ---------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    check_launch_matches_machine()
    per_step = cfg.per_device_batch_size * world_size()
    if cfg.global_batch_size % per_step:
        raise TrainingSetupError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of per_device_batch_size "
            f"({cfg.per_device_batch_size}) x processes ({world_size()}).")
    # On CPU the process group must be gloo, or every rank believes it is rank 0 of 1.
    distributed_cpu = world_size() > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.global_batch_size // per_step,
        mixed_precision=None if _deepspeed_launch() else cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tb")),
        kwargs_handlers=handlers,
    )
    return accelerator


def fill_deepspeed_sizes(accelerator: Accelerator, model) -> None:
    """Resolve the DeepSpeed config's hidden-size-based "auto" entries from the language model's width.

    accelerate's own rule (bucket sizes h x h and 0.9 h x h, parameters under 10 h elements kept whole
    on every rank); it reads `model.config.hidden_size`, which a Qwen2.5-VL config keeps in its
    `text_config`. At the 7B's width (3584) these are the values DeepSpeed's published ZeRO-3 examples
    use; on a small model they keep the per-module gathers and reductions that a large one has.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = getattr(model, "config", None)
    hidden = getattr(getattr(config, "text_config", config), "hidden_size", None)
    if hidden is None:
        return
    sizes = deepspeed_auto_sizes(hidden)
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    zero.update({key: value for key, value in sizes.items() if zero.get(key) == "auto"})


def deepspeed_auto_sizes(hidden: int) -> dict[str, int]:
    """The values `fill_deepspeed_sizes` gives the "auto" ZeRO entries at text width `hidden`."""
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_launch_matches_machine() -> None:
    """A GPU launch configuration on a machine without GPUs fails here, not deep inside a library."""
    if torch.cuda.is_available():
        return
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return
    ds_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    asks_gpu = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") in ("bf16", "fp16") and world_size() > 1
    if ds_config and Path(ds_config).is_file():
        ds = json.loads(Path(ds_config).read_text())
        asks_gpu = asks_gpu or _enabled(ds.get("bf16")) or _enabled(ds.get("fp16"))
    if asks_gpu:
        raise TrainingSetupError(
            "This launch configuration asks for GPUs (bf16/fp16 under DeepSpeed or several GPU processes), but no "
            "CUDA device is visible. On a CPU machine use configs/accelerate/cpu_2proc_zero2.yaml (or zero3).")


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


# -- data ----------------------------------------------------------------------------------------
class RecordList(Dataset):
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


def load_stage_data(cfg: TrainConfig, processor, main_process: bool) -> tuple[StageInfo, RecordList, dict]:
    """Read the stage's records, check their images exist and drop (and report) over-long ones."""
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise TrainingSetupError(f"data folder {folder} does not exist; build it with data_builders/stage{cfg.stage}.py")
    info = StageInfo.read(folder)
    check_pixel_frame(info, folder, processor)
    kept, report = [], {"records": 0, "too_long": [], "longest": 0}
    for record in read_records(folder):
        report["records"] += 1
        for path in [*record.images, *([record.mask] if record.mask else [])]:
            if not info.image_path(record, path).is_file():
                raise TrainingSetupError(f"record {record.id} references {info.image_path(record, path)}, "
                                         "which does not exist")
        length = record_length(processor, record, info)
        report["longest"] = max(report["longest"], length)
        if length > cfg.max_length:
            report["too_long"].append(record.id)
            continue
        kept.append(_as_row(record))
    if not kept:
        raise TrainingSetupError(f"{folder}: no record fits max_length={cfg.max_length} "
                                 f"({report['records']} records, longest {report['longest']} tokens)")
    if report["too_long"] and main_process:
        print(f"Skipped {len(report['too_long'])} of {report['records']} records longer than max_length="
              f"{cfg.max_length} tokens (first: {report['too_long'][:5]}); raise max_length to keep them.")
    return info, RecordList(kept), report


def check_pixel_frame(info: StageInfo, folder: Path, processor) -> None:
    """The stage's box coordinates must be pixels of the images as this processor resizes them."""
    if info.pixels is None:
        return  # no boxes (stage 1), or built before the resize was recorded
    ours = asdict(ResizeRule.of_processor(processor))
    if info.pixels != ours:
        raise TrainingSetupError(
            f"{folder} was built with boxes in images resized by {info.pixels}, but the model's processor (with "
            f"min_pixels / max_pixels) resizes by {ours}: the boxes would point at the wrong pixels. Set min_pixels="
            f"{info.pixels['min_pixels']} max_pixels={info.pixels['max_pixels']}, or rebuild the stage for this model "
            f"(the builder's --model, or --min-pixels {ours['min_pixels']} --max-pixels {ours['max_pixels']}).")


def _as_row(record: TrainingRecord) -> dict:
    return json.loads(record.to_json())


def epoch_order(num_records: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator).tolist()


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed, self.epoch = num_records, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.num_records, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.num_records


def build_dataloader(cfg: TrainConfig, dataset: RecordList, collator: RecordCollator) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.per_device_batch_size, sampler=EpochSampler(len(dataset), cfg.seed),
                      collate_fn=collator, num_workers=cfg.num_workers, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)


# -- model ---------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, main_process: bool):
    try:
        check_checkpoint(cfg.model)
    except FileNotFoundError as err:
        hint = f" (the output of stage {cfg.stage - 1}? run it first)" if cfg.stage > 1 else ""
        raise TrainingSetupError(f"model {cfg.model} does not exist{hint}") from err
    try:
        processor = load_processor(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except ValueError as err:  # a bad pixel limit
        raise TrainingSetupError(str(err)) from err
    # Without DeepSpeed the weights stay fp32, the optimizer's master copy, and accelerate's
    # mixed_precision runs the forward under bf16 autocast: in bf16 weights an update of lr 2e-6
    # rounds away. DeepSpeed's bf16/fp16 engine casts the module itself and keeps fp32 master
    # weights in its optimizer (ZeRO-3's zero.Init casts to its config's dtype while loading), so
    # there 16-bit loading only saves host memory.
    dtype = deepspeed_weights_dtype() if _deepspeed_launch() else torch.float32
    model = load_model(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation, iadgpt=cfg.iadgpt,
                       processor=processor)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.freeze_vision:
        freeze_vision_encoder(model, keep_merger=not cfg.freeze_merger)
    if cfg.lora.enabled:
        if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            raise TrainingSetupError("LoRA is supported under DeepSpeed ZeRO-2 (or without DeepSpeed); ZeRO-3 "
                                     "partitions the weights the adapters are merged into. Use a zero2 config.")
        model = add_lora(model, cfg)
    if main_process:
        total, trainable = parameter_counts(model)
        print(f"Model {cfg.model}: {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable")
    return model, processor


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every decoder layer and vision block, non-reentrant: the attention-map hooks run
    inside checkpointed layers and must keep their gradients.

    transformers also hooks the input embeddings of every sub-model so that their outputs require a
    gradient (`enable_input_require_grads`), which only reentrant checkpointing needs. Removed here:
    on the vision tower's patch embedding it makes a frozen tower keep its activations and run
    backward for nothing (stage 3 freezes it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    model.config.use_cache = False


def deepspeed_weights_dtype() -> torch.dtype:
    """The dtype DeepSpeed trains the module in: bf16 / fp16 where its config (as the Accelerator
    resolved it from the launch's mixed_precision) enables them, else fp32."""
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    config = plugin.deepspeed_config if plugin is not None else {}
    if _enabled(config.get("bf16")):
        return torch.bfloat16
    if _enabled(config.get("fp16")):
        return torch.float16
    return torch.float32


def parameter_counts(model) -> tuple[int, int]:
    """(all, trainable) parameters of `model`, counted whole under ZeRO-3 too, where a partitioned
    parameter's numel() is 0 and its full size is `ds_numel`."""
    total = trainable = 0
    for param in model.parameters():
        size = getattr(param, "ds_numel", None) or param.numel()
        total += size
        trainable += size if param.requires_grad else 0
    return total, trainable


def freeze_vision_encoder(model, keep_merger: bool = True) -> None:
    visual = model.model.visual
    for name, param in visual.named_parameters():
        trainable = keep_merger and (name.startswith("merger.") or name.startswith("layer_fusion."))
        param.requires_grad_(trainable)


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    # Adapters only inside the language model: a regex over module names.
    targets = "|".join(cfg.lora.target_modules)
    config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({targets})")
    peft_model = get_peft_model(model, config)
    # The fusion weights are IADGPT's own: keep them trainable beside the adapters.
    fusion = getattr(peft_model.base_model.model.model.visual, "layer_fusion", None)
    if fusion is not None and not cfg.freeze_vision:
        fusion.logits.requires_grad_(True)
    return peft_model


def build_optimizer(cfg: TrainConfig, model, budget: "StepBudget", num_processes: int):
    """AdamW and a warm-up + cosine learning-rate schedule laid out over `budget.total_steps`, which
    the schedule re-reads at every step (a time budget may re-plan it, `StepBudget`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates in place: the loop implementation's temporaries are as large as the
    # largest parameter (at the released widths, 2.4 GB more for the 3B's embedding). DeepSpeed steps
    # its own flat partitions and keeps the default.
    fused = not _deepspeed_launch() and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None)
    # accelerate steps a prepared scheduler once per process at every optimizer step, so the
    # schedule is laid out over steps x processes to keep the same shape on any number of GPUs.
    warmup_ticks = math.ceil(cfg.warmup_ratio * budget.total_steps * num_processes)

    def warmup_then_cosine(tick: int) -> float:
        # transformers' get_cosine_schedule_with_warmup, with a horizon that can move
        ticks = budget.total_steps * num_processes
        if tick < warmup_ticks:
            return tick / max(1, warmup_ticks)
        progress = min(1.0, (tick - warmup_ticks) / max(1, ticks - warmup_ticks))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)


class StepBudget:
    """How many optimizer steps the run takes, and whether its wall-time budget is spent.

    Without `max_minutes` the count is fixed. With it the run stops (and saves) once the time is
    up; with `fit_steps_to_minutes` as well, the count is re-planned from the measured pace at every
    tenth of the time, so the learning-rate schedule ends with the time even when the planned pace
    was wrong (a step-time probe on a busy machine, a slower node). The pace is that of the steps
    since the previous re-plan, so a slow start (data workers starting, a neighbour's burst) does not
    set the plan for good; a run that reaches its count before nine tenths of its time re-plans at
    once rather than stop early. Every process decides from the slowest process's clock, so all
    stop at the same step.
    """

    REPLANS = 9
    """Re-plans at 1/10, 2/10, ..., 9/10 of the time."""

    def __init__(self, total_steps: int, max_minutes: float | None = None, fit_steps_to_minutes: bool = False):
        if fit_steps_to_minutes and max_minutes is None:
            raise TrainingSetupError("fit_steps_to_minutes needs max_minutes: a time budget to fit the steps to.")
        self.total_steps = total_steps
        self.seconds = None if max_minutes is None else 60.0 * max_minutes
        self.fit = fit_steps_to_minutes
        self.tenths_passed = 0  # re-plan points behind us
        self.out_of_time = False
        self._paced_from: tuple[int, float] | None = None  # (step, elapsed) where the current pace window starts

    def update(self, step: int, elapsed: float) -> None:
        """After optimizer step `step`, `elapsed` seconds into the run (the same on every process)."""
        if self.seconds is None:
            return
        self.out_of_time = elapsed > self.seconds
        if self._paced_from is None:
            self._paced_from = (step, elapsed)  # the first step pays for warm-up: not paced
            return
        if not self.fit or step == self._paced_from[0]:
            return
        tenths = min(self.REPLANS, int(10 * elapsed / self.seconds))
        due = tenths > self.tenths_passed
        ends_early = step >= self.total_steps and tenths < self.REPLANS
        if due or ends_early:
            self.total_steps = self.fitted_total(step, elapsed)
            self.tenths_passed = tenths
            self._paced_from = (step, elapsed)

    def fitted_total(self, step: int, elapsed: float) -> int:
        """The step count that ends the run at its time budget at the pace of the current window."""
        first_step, first_elapsed = self._paced_from
        pace = (elapsed - first_elapsed) / max(1, step - first_step)  # seconds per optimizer step
        return step + max(1, int((self.seconds - elapsed) / max(pace, 1e-9)))


def weights_fingerprint(accelerator: Accelerator, model) -> list[float]:
    """Per rank, a checksum of the full weights (gathered one parameter at a time under ZeRO-3):
    after a step every rank must hold the same model."""
    unwrapped = accelerator.unwrap_model(model)
    total = 0.0

    def absolute_sum(param) -> float:
        # in slices: a float64 copy of a released model's embedding would take 2.5-4.4 GB
        return sum(float(part.abs().sum(dtype=torch.float64)) for part in param.detach().flatten().split(1 << 24))

    for param in unwrapped.parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gather this one parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                total += absolute_sum(param)
        else:
            total += absolute_sum(param)
    from accelerate.utils import gather_object

    return gather_object([total])


def fault_injection(step: int) -> None:
    """Test hook: IADGPT_FAULT_AFTER_STEP=N kills the process (SIGKILL, no cleanup) after step N."""
    if os.environ.get("IADGPT_FAULT_AFTER_STEP") == str(step):
        os.kill(os.getpid(), 9)


# -- run folder ----------------------------------------------------------------------------------
LOCK_FILE = ".train.lock"
"""The file in output_dir whose exclusive flock marks the folder as in use by a run."""
RUN_SETTINGS = ("model", "data", "seed", "global_batch_size", "per_device_batch_size")
"""What a resumed run must share with the checkpoint it continues: other weights, records, data
order or batch layout would make the saved optimizer state and data position meaningless."""
RUN_OUTPUTS = ("config.json", "model.safetensors.index.json", "adapter_config.json", "train_config.json",
               "train_summary.json", "metrics.jsonl")
"""Files a run writes at the top of output_dir, beside `*.safetensors` and `tb/`."""


def run_identity(cfg: TrainConfig) -> dict:
    """The RUN_SETTINGS of `cfg`, with local paths made absolute (`runs/x` and `./runs/x` agree)."""
    return {"model": _location(cfg.model), "data": _location(cfg.data), "seed": cfg.seed,
            "global_batch_size": cfg.global_batch_size, "per_device_batch_size": cfg.per_device_batch_size}


def _location(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path  # a hub name stays as given


def _saved_run(folder: Path) -> dict | None:
    """The run identity a checkpoint folder recorded, or None when it has none (or is unreadable)."""
    try:
        run = json.loads((folder / "trainer_state.json").read_text()).get("run")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def check_same_run(folder: Path, cfg: TrainConfig) -> None:
    """Refuse to resume from `folder` unless it was saved by a run with this run's RUN_SETTINGS."""
    saved = _saved_run(folder)
    if saved is None:
        raise TrainingSetupError(
            f"cannot resume from {folder}: its trainer_state.json records no run settings (not written by this "
            "train.py). Resume only from your own runs' checkpoints.")
    current = run_identity(cfg)
    differences = [f"{key}={saved.get(key)!r} in the checkpoint but {current[key]!r} now"
                   for key in RUN_SETTINGS if saved.get(key) != current[key]]
    if differences:
        raise TrainingSetupError(
            f"cannot resume from {folder}: " + "; ".join(differences) + ". Resume with the run's own settings, or "
            "start a new run (another output_dir, or overwrite=true to replace this one).")


def earlier_run_outputs(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in output_dir: its checkpoints and its final model (not its logs)."""
    out = Path(output_dir)
    model = [out / name for name in ("config.json", "adapter_config.json") if (out / name).is_file()]
    return [*checkpoint_dirs(out), *model, *sorted(out.glob("*.safetensors"))]


def _remove_earlier_run(out: Path) -> None:
    """overwrite=true: remove the checkpoints, final model and logs of the run that was here."""
    for path in [*checkpoint_dirs(out), *sorted(out.glob("*.safetensors")), out / "tb",
                 *(out / name for name in RUN_OUTPUTS)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()


def _lock(out: Path):
    """An exclusive flock on output_dir's lock file; the kernel drops it when the process ends, crash or not."""
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise TrainingSetupError(f"output_dir {out} is in use by another training run ({holder} holds "
                                 f"{out / LOCK_FILE}); wait for it to end or choose another output_dir.") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _claim(out: Path, cfg: TrainConfig, resume: bool):
    """Main process: lock output_dir and check it suits this run; returns the lock's file."""
    if _location(cfg.model) == str(out.resolve()):
        raise TrainingSetupError(f"output_dir {out} is the starting model's folder (model={cfg.model}); "
                                 "write the new model to another folder.")
    handle = _lock(out)
    try:
        checkpoints = checkpoint_dirs(out)
        if resume and checkpoints:
            check_same_run(checkpoints[-1], cfg)
            return handle
        earlier = earlier_run_outputs(out)
        if earlier and not cfg.overwrite:
            found = ", ".join(str(p.relative_to(out)) for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            what = "has no checkpoint to resume from but holds" if resume else "holds"
            raise TrainingSetupError(
                f"output_dir {out} {what} another run ({found}). Continue it with --resume, replace it with "
                "overwrite=true, or choose another output_dir.")
        if earlier:
            print(f"overwrite=true: removing the earlier run in {out}")
        _remove_earlier_run(out)
    except BaseException:
        handle.close()
        raise
    return handle


@contextlib.contextmanager
def claimed_output_dir(accelerator: Accelerator, cfg: TrainConfig, resume: bool):
    """Hold `output_dir` for the run: one run per folder at a time, and no run's work lost to another.

    The main process takes an exclusive lock (released when the block ends or the process dies),
    refuses a fresh run into a folder holding an earlier run's checkpoints or final model unless
    `overwrite` is set (then removes them), and refuses `--resume` from a checkpoint of a run with
    other RUN_SETTINGS. Every process raises the same error.
    """
    handle, problem = None, None
    if accelerator.is_main_process:
        try:
            handle = _claim(Path(cfg.output_dir), cfg, resume)
        except TrainingSetupError as err:
            problem = str(err)
        except OSError as err:  # a folder that cannot be created or written
            problem = f"output_dir {cfg.output_dir}: {err.strerror or err}" + (
                f" ({err.filename})" if err.filename and str(err.filename) != cfg.output_dir else "")
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise TrainingSetupError(problem)
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "trainer_state.json").is_file())


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, state: dict) -> Path:
    """Save a resumable checkpoint; a crash mid-write leaves only a `.tmp` folder, never a broken one."""
    root = Path(cfg.output_dir) / CHECKPOINTS
    final = root / f"step-{state['step']:07d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "run": run_identity(cfg)}, indent=2))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        prune_checkpoints(cfg.output_dir, run_identity(cfg), cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, identity: dict, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints of the run with `identity`; any other folder or
    file under checkpoints/ (another run's, a user's) is left alone. Returns the removed folders."""
    own = [p for p in checkpoint_dirs(output_dir) if _saved_run(p) == identity and (p / MANIFEST).is_file()]
    removed = own[:-keep] if keep > 0 else own
    for old in removed:
        remove_checkpoint(old)
    return removed


def remove_checkpoint(folder: Path) -> None:
    """Delete the files a checkpoint's manifest lists (and the manifest), then its emptied folders;
    anything else someone put there stays, with the folder that holds it."""
    listed = json.loads((folder / MANIFEST).read_text())["sha256"]
    for name in listed:
        (folder / name).unlink(missing_ok=True)
    (folder / MANIFEST).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if any(folder.iterdir()):
        print(f"Kept {folder}: it holds files the checkpoint did not write")
    else:
        folder.rmdir()


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL on large blocks
        return dict(zip(names, pool.map(lambda name: file_sha256(folder / name), names)))


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file of a checkpoint folder in its MANIFEST.

    accelerate's and DeepSpeed's checkpoint files are pickles (DeepSpeed loads them with
    weights_only=False): loading one runs whatever code it holds. Only files that still match the
    digests this run wrote are loaded back (`verify_manifest`)."""
    digests = _digests(folder, _checkpoint_files(folder))
    (folder / MANIFEST).write_text(json.dumps({"format": "iadgpt-checkpoint-manifest/1", "sha256": digests},
                                              indent=1))


def verify_manifest(folder: Path) -> None:
    """Refuse a checkpoint whose files are not exactly those its MANIFEST lists, with those digests."""
    path = folder / MANIFEST
    advice = "Resume only from checkpoints your own runs wrote; start a new run otherwise."
    try:
        listed = json.loads(path.read_text())["sha256"]
        assert isinstance(listed, dict)
    except FileNotFoundError:
        raise TrainingSetupError(f"cannot resume from {folder}: it has no {MANIFEST} (not written by this "
                                 f"train.py), so its pickled files cannot be checked. {advice}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise TrainingSetupError(f"cannot resume from {folder}: {path} is not a valid manifest. {advice}") from None
    present = _checkpoint_files(folder)
    unlisted = sorted(set(present) - set(listed))
    missing = sorted(set(listed) - set(present))
    if unlisted or missing:
        what = f"{folder / unlisted[0]} is not in its manifest" if unlisted else f"{folder / missing[0]} is missing"
        raise TrainingSetupError(f"cannot resume from {folder}: {what}. {advice}")
    for name, digest in _digests(folder, present).items():
        if digest != listed[name]:
            raise TrainingSetupError(f"cannot resume from {folder}: {folder / name} does not match the SHA-256 "
                                     f"recorded when it was saved (changed since). {advice}")


def load_latest_checkpoint(accelerator: Accelerator, cfg: TrainConfig) -> dict | None:
    """Load the newest checkpoint in output_dir (None when there is none); refuses one whose files do
    not match the SHA-256 digests saved with them (`claimed_output_dir` has already refused one saved
    by a run with other RUN_SETTINGS)."""
    found = checkpoint_dirs(cfg.output_dir)
    if not found:
        return None
    latest = found[-1]
    problem = None
    if accelerator.is_main_process:
        try:
            verify_manifest(latest)
        except TrainingSetupError as err:
            problem = str(err)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise TrainingSetupError(problem)
    accelerator.load_state(str(latest))
    state = json.loads((latest / "trainer_state.json").read_text())
    state.pop("run", None)
    return state


def save_final_model(accelerator: Accelerator, cfg: TrainConfig, model, processor) -> Path:
    out = Path(cfg.output_dir)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.lora.enabled and cfg.lora.merge:
            # A plain checkpoint: the adapters folded into the weights they adapt.
            unwrapped = unwrapped.merge_and_unload()
            state_dict = unwrapped.state_dict()
        # With LoRA and merge=false this writes the adapter only (load it with peft on the base model).
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(out)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator.wait_for_everyone()
    return out


# -- what users watch ----------------------------------------------------------------------------
class MetricsLog:
    """One JSON line per logged optimizer step in `metrics.jsonl` (main process), and TensorBoard."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, resume_step: int | None):
        """`resume_step`: the step a resumed run continues from (rows after it are cut: the run logs
        them again); None for a fresh run (the file starts empty)."""
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if (step := _logged_step(line)) is not None and step <= resume_step]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line cut short by a kill."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class StepMeter:
    """Averages the loss parts over the micro-batches of one optimizer step and across processes."""

    PARTS = ("loss", "lm_loss", "focal_loss", "dice_loss", "score_loss")

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.PARTS) * 2)
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, output, batch_size: int) -> None:
        for i, part in enumerate(self.PARTS):
            value = getattr(output, part, None)
            if value is not None:
                self.sums[2 * i] += float(value.detach())
                self.sums[2 * i + 1] += 1
        self.samples += batch_size

    def result(self) -> dict:
        sums = self.accelerator.reduce(self.sums.to(self.accelerator.device), reduction="sum").cpu()
        samples = self.accelerator.reduce(torch.tensor(float(self.samples), device=self.accelerator.device),
                                          reduction="sum").item()
        values = {part: (sums[2 * i] / sums[2 * i + 1]).item() for i, part in enumerate(self.PARTS)
                  if sums[2 * i + 1] > 0}
        values["samples_per_s"] = samples / max(time.perf_counter() - self.start, 1e-9)
        return values


def model_state_gib(model, processes: int, zero_stage: int | None) -> dict:
    """GiB per process for weights, gradients and AdamW states (activations come on top).

    16-bit weights (DeepSpeed's bf16/fp16) come with 16-bit gradients plus fp32 master weights and
    two fp32 Adam moments (2 + 2 + 12 bytes per trainable parameter); fp32 weights, also those
    trained under bf16 autocast without DeepSpeed, 4 + 4 + 8. The weights' dtype says which. ZeRO-1/2
    shard the optimizer states (and ZeRO-2 the gradients) over the processes; ZeRO-3 also the
    weights. Sizes are those of the whole model (`parameter_counts`), partitioned or not.
    """
    total, trainable = parameter_counts(model)
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if half else (4, 4, 8)
    stage = zero_stage or 0
    shard = lambda n, from_stage: n / processes if stage >= from_stage else n  # noqa: E731
    gib = 1024 ** 3
    return {"weights": shard(total * weight_bytes, 3) / gib, "gradients": shard(trainable * grad_bytes, 2) / gib,
            "optimizer": shard(trainable * optim_bytes, 1) / gib}


def token_estimate(processor, settings, image_sizes=((448, 448), (1024, 1024)), shots=(0, 1, 2, 4),
                   prompt_tokens: int = 80) -> list[dict]:
    """Tokens per stage-3 sample by shot count and resolution, with and without exemplar compression."""
    from ..model.compression import exemplar_token_count

    image_processor = processor.image_processor
    merge = image_processor.merge_size ** 2
    retention = settings.exemplar_retention
    rows = []
    for height, width in image_sizes:
        per_image = image_processor.get_number_of_image_patches(height, width, {}) // merge
        for k in shots:
            rows.append({"image": f"{height}x{width}", "shots": k, "tokens": prompt_tokens + (k + 1) * per_image,
                         "tokens_compressed": prompt_tokens + per_image + exemplar_token_count(per_image, k, retention)})
    return rows
