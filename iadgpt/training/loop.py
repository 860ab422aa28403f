"""The training loop: one stage of IADGPT training under whatever accelerate/DeepSpeed setup launched it.

`train/train.py` is the command-line recipe around it; the quickstart calls it in-process. The loop
reads like nanoGPT's: build the pieces, resume if asked, step, log, checkpoint, save.
"""

from __future__ import annotations

import json
import math
import time

import torch
from tqdm.auto import tqdm

from .collator import RecordCollator
from .config import TrainConfig
from .trainer import (
    MetricsLog,
    StepBudget,
    StepMeter,
    build_accelerator,
    build_dataloader,
    build_model,
    build_optimizer,
    claimed_output_dir,
    fill_deepspeed_sizes,
    fault_injection,
    load_latest_checkpoint,
    load_stage_data,
    model_state_gib,
    save_checkpoint,
    save_final_model,
    token_estimate,
    weights_fingerprint,
)


def train(cfg: TrainConfig, resume: bool = False) -> None:
    accelerator = build_accelerator(cfg)
    with claimed_output_dir(accelerator, cfg, resume):  # one run per folder; no run's work lost to another
        _train(cfg, resume, accelerator)


def _train(cfg: TrainConfig, resume: bool, accelerator) -> None:
    # 1. Launch setup, model and data; every check happens before the first step.
    main_process = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model, processor = build_model(cfg, main_process)
    info, dataset, _ = load_stage_data(cfg, processor, main_process)
    collator = RecordCollator(processor, info, pixel_loss_on_normals=cfg.pixel_loss_on_normals)
    loader = build_dataloader(cfg, dataset, collator)
    # len(loader) counts the batches of all processes: after prepare() each process gets its share.
    steps_per_epoch = math.ceil(len(loader) / (accelerator.num_processes * accelerator.gradient_accumulation_steps))
    budget = StepBudget(cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch), cfg.max_minutes,
                        cfg.fit_steps_to_minutes)
    optimizer, scheduler = build_optimizer(cfg, model, budget, accelerator.num_processes)
    if main_process:
        print(f"Stage {cfg.stage}: {len(dataset)} records, {budget.total_steps} optimizer steps of "
              f"{cfg.global_batch_size} samples ({accelerator.num_processes} processes x {cfg.per_device_batch_size} x "
              f"{accelerator.gradient_accumulation_steps} accumulation)"
              + (f", re-fitted to {cfg.max_minutes} min as they run" if budget.fit else ""))
        settings = accelerator.unwrap_model(model)
        settings = getattr(settings, "iadgpt", None) or settings.base_model.model.iadgpt
        zero = accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None
        memory = model_state_gib(model, accelerator.num_processes, zero)
        print(f"  model states per process (ZeRO-{zero or 0}): weights {memory['weights']:.2f} GiB, gradients "
              f"{memory['gradients']:.2f} GiB, AdamW {memory['optimizer']:.2f} GiB, plus activations")
        for row in token_estimate(processor, settings):
            print(f"  tokens per sample at {row['image']}, {row['shots']}-shot: {row['tokens']}"
                  f" ({row['tokens_compressed']} with exemplar compression)")
    fill_deepspeed_sizes(accelerator, model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.init_trackers("iadgpt", config={"stage": cfg.stage, "learning_rate": cfg.learning_rate})

    # 2. Resume: same step, data position, optimizer, scheduler and RNG state.
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    if resume:
        state = load_latest_checkpoint(accelerator, cfg) or state
        budget.total_steps = state.get("total_steps", budget.total_steps)  # as re-planned before the stop
        if main_process:
            print(f"Resuming at step {state['step']} (epoch {state['epoch']}, batch {state['batches_in_epoch']})")
    metrics = MetricsLog(accelerator, cfg.output_dir, resume_step=state["step"] if resume else None)

    # 3. The loop.
    meter = StepMeter(accelerator)
    progress = tqdm(total=budget.total_steps, initial=state["step"], disable=not main_process,
                    desc=f"stage {cfg.stage}")
    started = time.monotonic()
    model.train()
    while state["step"] < budget.total_steps:
        loader.set_epoch(state["epoch"])  # the shuffled order is a function of (seed, epoch)
        batches = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
        for batch in batches:
            with accelerator.accumulate(model):
                output = model(**batch)
                accelerator.backward(output.loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            meter.add(output, batch["input_ids"].shape[0])
            state["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            values = meter.result()
            values.update(lr=scheduler.get_last_lr()[0], epoch=state["epoch"])
            meter.reset()
            if state["step"] % cfg.log_every == 0:
                metrics.log(state["step"], values)
            if budget.seconds is not None:
                # every process decides from the slowest clock, so all stop at the same step
                elapsed = accelerator.gather(torch.tensor([time.monotonic() - started], device=accelerator.device))
                budget.update(state["step"], float(elapsed.max()))
                state["total_steps"] = progress.total = budget.total_steps
            progress.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.1f}")
            progress.update(1)
            if state["step"] % cfg.save_every == 0 or state["step"] == budget.total_steps or budget.out_of_time:
                save_checkpoint(accelerator, cfg, state)
            fault_injection(state["step"])
            if state["step"] >= budget.total_steps or budget.out_of_time:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            continue
        break
    progress.close()

    # 4. The output every later stage, evaluation and chat load.
    fingerprints = weights_fingerprint(accelerator, model)
    out = save_final_model(accelerator, cfg, model, processor)
    accelerator.end_training()
    if main_process:
        summary = {"steps": state["step"], "processes": accelerator.num_processes, "weight_fingerprints": fingerprints,
                   "ranks_hold_equal_weights": len(set(fingerprints)) == 1}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"Saved stage {cfg.stage} model to {out}")
