"""`iadgpt plan`: will this stage fit on these GPUs, how many tokens per sample, how long will it take?"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from .planner import (
    GIB,
    REPO_CONFIGS,
    Plan,
    PlanError,
    RunSettings,
    count_parameters,
    flops_per_sample,
    load_model_config,
    memory_plan,
    model_shape,
    stage_sample,
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True,
                        help="qwen2.5-vl-3b | qwen2.5-vl-7b | qwen2.5-vl-32b | qwen2.5-vl-72b (the released configs), "
                             "tiny | small (test presets), or a checkpoint folder with config.json")
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3),
                        help="training stage; its settings come from configs/stage<N>.yaml (or --config)")
    parser.add_argument("--config", help="a stage YAML of your own instead of the shipped configs/stage<N>.yaml")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpu-memory", type=float, required=True, metavar="GB",
                        help="memory of one GPU in GB as sold (80 for an H100 80GB; 1 GB = 10^9 bytes)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2,
                        help="DeepSpeed ZeRO stage (default 2, as the README's launch configs; 0: no DeepSpeed)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 (default: DeepSpeed's bf16 engine, or bf16 autocast over fp32 weights without "
                             "DeepSpeed) or fp32 throughout (mixed_precision=no; DeepSpeed on a CPU)")
    parser.add_argument("--offload", action="store_true",
                        help="ZeRO-Offload: optimizer states (and under ZeRO-3 the weights) in CPU memory")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (the config's lora settings) instead of "
                                                            "full fine-tuning")
    parser.add_argument("--shots", type=int, default=4, help="stage 3: normal exemplars per sample (default 4)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, metavar="PX", default=1024,
                      help="side of the (square) images before the processor's resize (default 1024, MVTec-AD's)")
    size.add_argument("--max-pixels", type=int, metavar="P",
                      help="cap the resized image area (default: the config's, else the model processor's)")
    parser.add_argument("--retention", type=float, help="exemplar tokens kept by compression (default: the model's)")
    parser.add_argument("--per-device-batch", type=int, metavar="B", help="samples per GPU per forward")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), help="default: the config's (on)")
    parser.add_argument("--records", type=int, help="records in the stage folder, for the epoch time")
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample (default: the stage's typical)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOPS of one GPU (default 989: H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.35,
                        help="assumed model FLOPs utilisation for the time estimate (default 0.35)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def make_plan(args: argparse.Namespace, suggest: bool = True) -> Plan:
    """The plan of `args`; with `suggest`, the nearest settings that fit when it does not."""
    from ..config import load_config
    from ..model.checkpoint import check_pixel_limits
    from ..model.settings import IADGPTSettings
    from ..training.config import TrainConfig

    if args.gpus < 1 or args.nodes < 1:
        raise PlanError(f"--gpus {args.gpus} --nodes {args.nodes}: a plan needs at least one GPU on one node")
    if args.gpu_memory <= 0:
        raise PlanError(f"--gpu-memory {args.gpu_memory}: must be the GPU's memory in GB, > 0")
    zero = args.zero or None
    if args.offload and zero is None:
        raise PlanError("--offload moves DeepSpeed's optimizer states to the CPU: it needs --zero 1, 2 or 3")
    if args.lora and zero == 3:
        raise PlanError("--lora with --zero 3: the recipe refuses it (ZeRO-3 partitions the weights the adapters "
                        "are merged into); use --zero 2")
    config_path = args.config or REPO_CONFIGS / f"stage{args.stage}.yaml"
    cfg = load_config(TrainConfig, config_path)
    config, name, pixels = load_model_config(args.model)
    settings = IADGPTSettings.from_dict(getattr(config, "iadgpt", None), cfg.iadgpt)
    retention = settings.exemplar_retention if args.retention is None else args.retention
    if not 0 < retention <= 1:
        raise PlanError(f"--retention {retention}: the fraction of exemplar tokens kept is in (0, 1]")
    if args.shots < 0 or (args.stage == 3 and args.shots < 1):
        raise PlanError(f"--shots {args.shots}: stage 3 samples have 1 or more normal exemplars")
    shape = model_shape(config, name, pixels)
    min_pixels = cfg.min_pixels or shape.min_pixels
    max_pixels = args.max_pixels if args.max_pixels is not None else (cfg.max_pixels or shape.max_pixels)
    try:
        check_pixel_limits(min_pixels, max_pixels)
    except ValueError as err:
        raise PlanError(f"--max-pixels {max_pixels}: {err}") from err
    image_size = args.image_size if args.max_pixels is None else math.isqrt(max_pixels)
    sample, tokens = stage_sample(shape, args.stage, args.shots, image_size, min_pixels, max_pixels, retention,
                                  args.text_tokens)
    if args.records is not None and args.records < 1:
        raise PlanError(f"--records {args.records}: a stage has at least one record")
    lora = replace(cfg.lora, enabled=True) if args.lora else cfg.lora
    params = count_parameters(config, cfg.freeze_vision, cfg.freeze_merger, lora)
    processes = args.gpus * args.nodes
    checkpointing = cfg.gradient_checkpointing if args.gradient_checkpointing is None \
        else args.gradient_checkpointing == "on"
    batch = args.per_device_batch or cfg.per_device_batch_size
    if batch < 1:
        raise PlanError(f"--per-device-batch {batch}: at least one sample per GPU")
    mode = "fp32" if args.precision == "fp32" else ("bf16" if zero else "autocast")
    run = RunSettings.from_deepspeed(
        _deepspeed_json(zero), shape.hidden, processes=processes, zero=zero, mode=mode,
        gradient_checkpointing=checkpointing, per_device_batch=batch,
        freeze_vision=cfg.freeze_vision and not args.lora, freeze_merger=cfg.freeze_merger, offload=args.offload)
    if args.lora:
        run = replace(run, freeze_vision=True, freeze_merger=True)
    return _plan(args, shape, params, sample, tokens, run, cfg, suggest)


def _deepspeed_json(zero: int | None) -> dict:
    if zero is None:
        return {}
    path = REPO_CONFIGS / "deepspeed" / f"zero{3 if zero == 3 else 2}.json"
    return json.loads(path.read_text()).get("zero_optimization", {}) if path.is_file() else {}


def _plan(args, shape, params, sample, tokens, run: RunSettings, cfg, suggest: bool = True) -> Plan:
    memory = memory_plan(shape, params, sample, run)
    gpu_bytes = args.gpu_memory * 1e9
    flops = flops_per_sample(shape, params, sample, run)
    samples_per_gpu_step = cfg.global_batch_size / run.processes
    peak = args.gpu_tflops * 1e12
    step_seconds = flops["flops"] * samples_per_gpu_step / (peak * args.mfu)
    timing = {"mfu": args.mfu, "gpu_tflops": args.gpu_tflops, "step_seconds": step_seconds,
              "global_batch_size": cfg.global_batch_size,
              "time_formula": "flops per sample x global batch / GPUs / (peak TFLOPS x MFU)"}
    if args.records:
        timing["epoch_hours"] = math.ceil(args.records / cfg.global_batch_size) * step_seconds / 3600
        timing["epochs"] = cfg.epochs
    plan = Plan(model=shape.name, stage=args.stage, run=run, params=params, tokens=tokens, memory=memory,
                gpu_bytes=gpu_bytes, flops=flops, timing=timing, fits=memory["total"] <= gpu_bytes)
    if suggest and not plan.fits:
        plan.suggestions = nearest_fits(args, shape, params, sample, run, cfg)
    return plan


def nearest_fits(args, shape, params, sample, run: RunSettings, cfg) -> list[dict]:
    """One change at a time from the request, in the order a user would try them; those that fit."""
    candidates: list[tuple[str, RunSettings, object]] = []
    if run.zero != 3 and not args.lora:
        candidates.append(("--zero 3", replace(run, zero=3, mode="fp32" if run.mode == "fp32" else "bf16"), sample))
    if run.zero and not run.offload:
        candidates.append(("--offload", replace(run, offload=True), sample))
    if not run.gradient_checkpointing:
        candidates.append(("--gradient-checkpointing on", replace(run, gradient_checkpointing=True), sample))
    if run.per_device_batch > 1:
        candidates.append(("--per-device-batch 1", replace(run, per_device_batch=1), sample))
    results = []
    for label, candidate, candidate_sample in candidates:
        memory = memory_plan(shape, params, candidate_sample, candidate)
        results.append({"change": label, "gib": memory["total"] / GIB, "fits": memory["total"] <= args.gpu_memory * 1e9})
    if not args.lora and run.zero != 3:
        lora_args = argparse.Namespace(**{**vars(args), "lora": True, "zero": run.zero or 2})
        lora_plan = make_plan(lora_args, suggest=False)
        results.append({"change": "--lora", "gib": lora_plan.memory["total"] / GIB, "fits": lora_plan.fits})
    if args.stage == 3 and args.shots > 1:
        for shots in range(args.shots - 1, 0, -1):
            smaller = make_plan(argparse.Namespace(**{**vars(args), "shots": shots}), suggest=False)
            if smaller.fits or shots == 1:
                results.append({"change": f"--shots {shots}", "gib": smaller.memory["total"] / GIB,
                                "fits": smaller.fits})
                break
    side = args.image_size if args.max_pixels is None else math.isqrt(args.max_pixels)
    for factor in (0.75, 0.5, 0.35, 0.25):
        pixels = int((side * factor) ** 2)
        try:
            smaller = make_plan(argparse.Namespace(**{**vars(args), "max_pixels": pixels, "image_size": None}),
                                suggest=False)
        except PlanError:  # below the processor's smallest image
            break
        if smaller.fits or factor == 0.25:
            results.append({"change": f"--max-pixels {pixels}", "gib": smaller.memory["total"] / GIB,
                            "fits": smaller.fits})
            break
    return [r for r in results if r["fits"]] or results


def describe(plan: Plan) -> str:
    run, m = plan.run, plan.memory
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    t = plan.tokens
    lines = [
        f"iadgpt plan: {plan.model}, stage {plan.stage}, {run.processes} GPU(s), "
        + (f"DeepSpeed ZeRO-{run.zero}" if run.zero else "no DeepSpeed")
        + {"bf16": " (bf16 weights)", "fp32": " (fp32)", "autocast": " (bf16 autocast, fp32 weights)"}[run.mode]
        + (" + offload" if run.offload else "") + f", per-device batch {run.per_device_batch}, "
        + f"gradient checkpointing {'on' if run.gradient_checkpointing else 'off'}",
        f"parameters: {plan.params.total / 1e9:.3f} B, trainable {plan.params.trainable / 1e9:.3f} B",
        "tokens per sample:",
        f"  text {t['text']}, visual {t['visual_per_image']} per image x {t['images']} images",
    ]
    if t["exemplars_uncompressed"]:
        lines.append(f"  exemplars: {t['exemplars_uncompressed']} tokens uncompressed, {t['exemplars_compressed']} "
                     "compressed")
    lines += [f"  language model runs on {t['total']} tokens ({t['total_uncompressed']} without compression)",
              "memory per GPU:"]
    for key, label in (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer (fp32 master + AdamW)"),
                       ("deepspeed_buffers", "DeepSpeed buffers"), ("activations", "activations saved for backward"),
                       ("logits_held", "logits held by the output"), ("backward_peak", "backward-only peak")):
        lines.append(f"  {label:<34}{g(m[key])}")
    for part, value in m["activation_parts_per_sample"].items():
        lines.append(f"    per sample, {part:<24}{g(value)}")
    per_sample = m["activations_per_sample"]
    lines.append(f"    per sample, checkpointing on / off {g(per_sample['with_checkpointing'])} / "
                 f"{per_sample['without_checkpointing'] / GIB:.2f} GiB")
    lines.append(f"  {'total':<34}{g(m['total'])}  of {g(plan.gpu_bytes)} ({plan.gpu_bytes / 1e9:.0f} GB)")
    c = plan.timing
    lines += [f"compute: {plan.flops['flops'] / 1e12:.1f} TFLOPs per sample ({plan.flops['formula']})",
              f"  step of {c['global_batch_size']} samples: {c['step_seconds']:.1f} s at MFU {c['mfu']} of "
              f"{c['gpu_tflops']:.0f} TFLOPS per GPU ({c['time_formula']})"]
    if "epoch_hours" in c:
        lines.append(f"  epoch: {c['epoch_hours']:.2f} h ({c['epochs']} epoch(s) in the config)")
    lines.append("verdict: " + ("fits" if plan.fits else "does NOT fit"))
    for s in plan.suggestions:
        lines.append(f"  {s['change']:<28} {s['gib']:8.2f} GiB  {'fits' if s['fits'] else 'still too large'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except (PlanError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"iadgpt plan: {err}") from err
    print(json.dumps(plan.to_dict(), indent=2) if args.json else describe(plan))
    return 0
