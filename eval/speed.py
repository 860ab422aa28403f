"""Speed and memory benchmarks, each variant measured side by side in one run.

    python eval/speed.py compression   # 4-shot prefill with vs without exemplar compression
    python eval/speed.py pixel-map     # our attention-row maps (sdpa) vs eager output_attentions
    python eval/speed.py eval          # batched single-pass scoring vs generating the answer text
    python eval/speed.py prefix-cache  # one product's queries with its references encoded once vs every time
    python eval/speed.py chat          # a conversation's 5th turn on its kept cache vs re-reading it all
    python eval/speed.py serve         # `iadgpt serve` under concurrent clients, micro-batched vs not
    python eval/speed.py data-build    # stage-2 records/s, and peak memory of a 10x larger build
    python eval/speed.py train         # training samples/s, 1 vs 2 CPU processes under DeepSpeed
    python eval/speed.py plan          # `iadgpt plan`'s memory parts vs the tensors of real training steps

Each prints its measurements, and as its last line one JSON object with the ratios.
The benchmark model is a random-weight Qwen2.5-VL of the real architecture, sized so that the
language model dominates as it does in the 7B model (8 layers, 512 wide; a small vision tower),
with 4 exemplars + 1 query of 504 x 504 px: 5 x 324 = 1,620 visual tokens. `eval` uses the
same model with 224 x 224 px images (64 visual tokens each), 16 queries, so it runs in about a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers import Qwen2_5_VLForConditionalGeneration

from iadgpt.evaluation.reasoning import parse_yes_no
from iadgpt.inspection import Inspector
from iadgpt.model import detection_inputs, init_model, load_model, load_processor
from iadgpt.model.checkpoint import ModelPreset
from iadgpt.utils.profiling import median_seconds, peak_rss_increase

BENCH_PRESET = ModelPreset(
    text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, text_intermediate=1408,
    mrope_section=(8, 12, 12), vision_hidden=64, vision_depth=4, vision_heads=2, vision_intermediate=128,
    fullatt_blocks=(1, 3), max_pixels=512 * 512,
)


def bench_images(count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """Smooth product-like images plus noise, so references resemble each other as real ones do."""
    base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    return [Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
            for _ in range(count)]


def bench_inputs(processor, shots: int, image_size: int, seed: int = 0):
    *normals, query = bench_images(shots + 1, image_size, np.random.default_rng(seed))
    return detection_inputs(processor, [normals], [query])


def compression(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "bench", BENCH_PRESET)
        processor = load_processor(ckpt)
        model = load_model(ckpt, iadgpt={"exemplar_retention": args.retention}).eval()
        inputs = bench_inputs(processor, args.shots, args.image_size)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    query_tokens = image_tokens // (args.shots + 1)
    exemplar_tokens = image_tokens - query_tokens
    with torch.inference_mode():
        compressed = model(**inputs, logits_to_keep=1)
        kept = int((compressed.kept_tokens & (inputs["input_ids"] == model.config.image_token_id)).sum())
        times = {}
        for name, flag in (("uncompressed", False), ("compressed", True)):
            times[name] = median_seconds(lambda: model(**inputs, logits_to_keep=1, compress_exemplars=flag),
                                         repeats=args.repeats)
    kept_exemplar = kept - query_tokens
    print(f"sequence: {inputs['input_ids'].shape[1]} tokens, {image_tokens} visual "
          f"({exemplar_tokens} exemplar, {query_tokens} query); kept exemplar tokens: {kept_exemplar}")
    print(f"prefill median of {args.repeats}: uncompressed {times['uncompressed']:.3f} s, "
          f"compressed {times['compressed']:.3f} s")
    return {"bench": "compression", "shots": args.shots, "retention": args.retention,
            "exemplar_token_ratio": round(kept_exemplar / exemplar_tokens, 4),
            "prefill_time_ratio": round(times["compressed"] / times["uncompressed"], 4)}


def pixel_map_worker(args) -> None:
    """One variant in a fresh process: peak memory, time and the maps, written to --result."""
    eager = args.variant == "eager"
    processor = load_processor(args.checkpoint)
    model = load_model(args.checkpoint, attn_implementation="eager" if eager else "sdpa",
                       iadgpt={"exemplar_retention": 1.0}).eval()
    inputs = bench_inputs(processor, args.shots, args.image_size)

    def ours():
        return model(**inputs, pixel_maps=True, logits_to_keep=1).anomaly_maps[0].flatten()

    def eager_maps():
        # The stock Qwen2.5-VL forward, as a user would run it to get attention weights.
        out = Qwen2_5_VLForConditionalGeneration.forward(model, **inputs, output_attentions=True, logits_to_keep=1)
        return model.anomaly_maps_from_attention_weights(out.attentions, inputs["input_ids"])[0]

    run = eager_maps if eager else ours
    with torch.inference_mode():
        peak_mib, maps = peak_rss_increase(run)
        seconds = median_seconds(run, repeats=args.repeats)
    np.save(args.result + ".npy", maps.float().numpy())
    Path(args.result).write_text(json.dumps({"peak_mib": peak_mib, "seconds": seconds}))


def pixel_map(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "bench", BENCH_PRESET)
        results = {}
        for variant in ("ours", "eager"):
            result = str(Path(tmp) / variant)
            subprocess.run([sys.executable, __file__, "pixel-map-worker", "--variant", variant, "--checkpoint",
                            str(ckpt), "--result", result, "--shots", str(args.shots), "--image-size",
                            str(args.image_size), "--repeats", str(args.repeats)], check=True)
            results[variant] = json.loads(Path(result).read_text())
            results[variant]["maps"] = np.load(result + ".npy")
    diff = float(np.abs(results["ours"]["maps"] - results["eager"]["maps"]).max())
    for variant in ("ours", "eager"):
        r = results[variant]
        print(f"{variant:5s}: median {r['seconds']:.3f} s, peak memory +{r['peak_mib']:.1f} MiB")
    print(f"max |ours - eager| over the map: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"maps differ by {diff:.2e} > 1e-4")
    return {"bench": "pixel_map", "time_ratio": round(results["ours"]["seconds"] / results["eager"]["seconds"], 4),
            "peak_mem_ratio": round(results["ours"]["peak_mib"] / results["eager"]["peak_mib"], 4)}


def eval_speed(args) -> dict:
    """Images per second: our batched single pass (score + pixel map) vs generating the answer text.

    Both sides get the same checkpoint, queries, references (one product's, as on a line or in a
    benchmark category), prompt (`Inspector.batch_inputs`, image preprocessing included in both
    timings) and batch size. The single pass is `Inspector.inspect` (no text): the references are
    encoded once (its reference cache, emptied before every run), then one forward per batch gives
    the Yes/No score and the pixel map. The
    baseline is how a chat LVLM is usually scored: greedy-generate up to 32 new tokens and read
    Yes/No from the text (`parse_yes_no`), without any pixel map.

    A random-weight model does not stop where a trained one would (it may run on, or stop at a
    random step), so generation is forced to exactly `--max-new-tokens` (min_new_tokens =
    max_new_tokens, EOS ignored): the baseline costs what a 32-token answer costs. A trained model
    that answers "Yes." and stops after 2-3 tokens would narrow the gap.

    The default model is BENCH_PRESET (the language model dominates, as in the 7B model); `--preset
    small` takes the demo preset, whose windowed vision tower dominates instead. The two variants
    run interleaved and the fastest of `--repeats` runs counts: on a shared machine other
    processes only ever add time.
    """
    rng = np.random.default_rng(0)
    queries = bench_images(args.queries, args.image_size, rng)
    normals = [bench_images(args.shots, args.image_size, rng)] * len(queries)  # one product's references
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "bench", BENCH_PRESET if args.preset == "bench" else args.preset)
        inspector = Inspector.from_pretrained(ckpt, batch_size=args.batch_size)
    model, processor = inspector.model, inspector.processor

    def single_pass():
        inspector.clear_reference_cache()  # each run encodes the product's references once
        return [r.score for r in inspector.inspect(queries, normals)]

    def generate():
        texts = []
        with torch.inference_mode():
            for start in range(0, len(queries), args.batch_size):
                chunk = slice(start, start + args.batch_size)
                inputs = inspector.batch_inputs(queries[chunk], normals[chunk], [[] for _ in queries[chunk]])
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                     min_new_tokens=args.max_new_tokens, do_sample=False)
                texts += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [parse_yes_no(text) for text in texts]

    single_pass(), generate()  # warm-up
    times: dict[str, list[float]] = {"single_pass": [], "generate": []}
    for _ in range(args.repeats):
        for name, run in (("single_pass", single_pass), ("generate", generate)):
            start = time.perf_counter()
            answers = run()
            times[name].append(time.perf_counter() - start)
    seconds = {name: min(values) for name, values in times.items()}
    rate = {name: len(queries) / value for name, value in seconds.items()}
    print(f"{len(queries)} queries x {args.shots} normal references, {args.image_size} px, batch {args.batch_size}, "
          f"preset {args.preset}, {torch.get_num_threads()} threads; fastest of {args.repeats} interleaved runs "
          f"after one warm-up")
    for name, label in (("single_pass", "single pass (score + pixel map)"),
                        ("generate", f"generate {args.max_new_tokens} tokens + read Yes/No")):
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{label}: {seconds[name]:.3f} s = {rate[name]:.2f} images/s (runs: {runs} s)")
    print(f"answers read as yes/no: {sum(a is not None for a in answers)}/{len(answers)} (the model is random)")
    return {"bench": "eval", "images_per_s_single_pass": round(rate["single_pass"], 3),
            "images_per_s_generate": round(rate["generate"], 3),
            "speedup": round(rate["single_pass"] / rate["generate"], 3)}


def prefix_cache(args) -> dict:
    """Queries per second of one product's inspection: its references encoded once (`Inspector`'s
    reference cache) vs whole prompts for every batch (`reference_cache_size=0`).

    Same model (BENCH_PRESET), references, queries (504 px) and batch size on both sides; the cache
    is emptied before every timed run, so the cached side pays for encoding the references once per
    run, as a line does per product. Scores and maps are compared first (`max_abs_diff`, over
    every query's score and its map at the query's resolution). Variants run interleaved, fastest
    of `--repeats` counts.
    """
    rng = np.random.default_rng(0)
    queries = bench_images(args.queries, args.image_size, rng)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "bench", BENCH_PRESET)
        cached = Inspector.from_pretrained(ckpt, batch_size=args.batch_size)
    whole = Inspector(cached.model, cached.processor, batch_size=args.batch_size, reference_cache_size=0)
    speedup, diff = {}, 0.0
    for shots in args.shot_counts:
        normals = [bench_images(shots, args.image_size, rng)] * len(queries)
        fast, slow = cached.inspect(queries, normals), whole.inspect(queries, normals)
        diff = max(diff, *(max(abs(a.score - b.score), float(np.abs(a.anomaly_map - b.anomaly_map).max()))
                          for a, b in zip(fast, slow)))
        times: dict[str, list[float]] = {"cached": [], "whole": []}
        for _ in range(args.repeats):
            for name, inspector in (("cached", cached), ("whole", whole)):
                inspector.clear_reference_cache()
                start = time.perf_counter()
                inspector.inspect(queries, normals)
                times[name].append(time.perf_counter() - start)
        rate = {name: len(queries) / min(values) for name, values in times.items()}
        speedup[str(shots)] = round(rate["cached"] / rate["whole"], 3)
        print(f"{shots}-shot, {len(queries)} queries of {args.image_size} px, batch {args.batch_size}: cached "
              f"{rate['cached']:.2f} queries/s, whole prompts {rate['whole']:.2f} queries/s "
              f"(fastest of {args.repeats}); speedup {speedup[str(shots)]}")
    print(f"largest difference of a score or map value, cached vs whole: {diff:.2e}")
    main_shots = str(max(args.shot_counts))
    return {"bench": "prefix_cache", "shots": int(main_shots), "speedup": speedup[main_shots],
            "max_abs_diff": float(f"{diff:.3g}"), "speedup_by_shots": speedup}


def chat_speed(args) -> dict:
    """The last turn of a conversation (4 normal references and a query, 504 px, BENCH_PRESET): answered
    on the conversation's kept cache (`KeptConversation`, what `iadgpt chat` does) vs re-reading the
    whole conversation, images included (`reply`, one generate() call).

    Both answer the same history with exactly `--max-new-tokens` tokens (a random model stops at random
    places, so stopping is off on both sides). The kept side is timed on a copy of the conversation
    taken before the last question, the fastest of `--repeats` interleaved runs.
    """
    import copy as copy_module

    from iadgpt.dialogue import Dialogue, KeptConversation, reply

    rng = np.random.default_rng(0)
    *normals, query = bench_images(args.shots + 1, args.image_size, rng)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "bench", BENCH_PRESET)
        inspector = Inspector.from_pretrained(ckpt)
    model, processor = inspector.model, inspector.processor
    questions = ["Is there any defect in the query image?", "Where is it?", "How large is it?",
                 "What could have caused it?", "Should this part be scrapped?"][:args.turns]
    conversation = KeptConversation(model, processor, Dialogue(query, normals))
    for question in questions[:-1]:
        conversation.ask(question, max_new_tokens=args.max_new_tokens, stop_token_ids=[])
    history_tokens = conversation.ids.shape[1]
    times: dict[str, list[float]] = {"kept": [], "reread": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        kept = copy_module.copy(conversation)
        kept.cache, kept.dialogue = copy_module.deepcopy(conversation.cache), copy_module.deepcopy(conversation.dialogue)
        start = time.perf_counter()
        kept.ask(questions[-1], max_new_tokens=args.max_new_tokens, stop_token_ids=[])
        times["kept"].append(time.perf_counter() - start)
        reread = copy_module.deepcopy(conversation.dialogue)
        start = time.perf_counter()
        reply(model, processor, [reread], [questions[-1]], max_new_tokens=args.max_new_tokens,
              min_new_tokens=args.max_new_tokens)
        times["reread"].append(time.perf_counter() - start)
    best = {name: min(values[1:]) for name, values in times.items()}
    print(f"turn {len(questions)} of a {args.shots}-shot conversation ({history_tokens} tokens before it, "
          f"{args.image_size} px images), {args.max_new_tokens}-token answers: kept cache {best['kept']:.3f} s, "
          f"re-reading {best['reread']:.3f} s (fastest of {args.repeats})")
    return {"bench": "chat", "turns": len(questions), "turn5_speedup": round(best["reread"] / best["kept"], 3)}


def serve_load(args) -> dict:
    """`iadgpt serve` on 127.0.0.1 (tiny preset, a 4-shot product), `--clients` threads each sending one
    query after another for `--seconds`, against a server that micro-batches (`--max-batch 8`) and one
    that does not (`--max-batch 1`), both running, in interleaved runs (best of `--repeats`: the clients
    share the 2 cores with the servers, so other work only slows a run down). Reports requests/s of
    both, their ratio, the best batched run's p99 latency, all errors, and how much the batched
    server's resident memory grew from the end of its warm-up to the end of all runs."""
    import base64
    import io
    import threading

    import httpx

    from iadgpt.serving.app import ServeSettings
    from iadgpt.serving.process import free_port, start

    if args.max_wait_ms is None:
        args.max_wait_ms = ServeSettings.max_wait_ms
    rng = np.random.default_rng(0)
    *normals, query = bench_images(args.shots + 1, args.image_size, rng)

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    body = {"product": "bench", "images": [base64.b64encode(png(query)).decode()]}

    def rss(pid: int) -> int:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS"))) * 1024

    def load(url: str, seconds: float) -> tuple[list[float], int]:
        latencies, errors, stop = [], [0], time.perf_counter() + seconds

        def client():
            with httpx.Client(timeout=60) as session:
                while time.perf_counter() < stop:
                    start_time = time.perf_counter()
                    try:
                        ok = session.post(f"{url}/v1/inspect", json=body).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        latencies.append(time.perf_counter() - start_time)
                    else:
                        errors[0] += 1

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return latencies, errors[0]

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_model(Path(tmp) / "tiny", "tiny")
        servers, urls, before = {}, {}, {}
        try:
            for name, batch in (("batched", 8), ("unbatched", 1)):
                port = free_port()
                servers[name] = start(ckpt, Path(tmp) / "products", port, "--max-batch", batch,
                                      "--max-wait-ms", args.max_wait_ms)
                urls[name] = f"http://127.0.0.1:{port}"
            httpx.post(f"{urls['batched']}/v1/products", data={"name": "bench"}, timeout=60,
                       files=[("normals", (f"{i}.png", png(n), "image/png")) for i, n in enumerate(normals)])
            for name in servers:
                load(urls[name], 3.0)  # warm-up
                before[name] = rss(servers[name].pid)
            # interleaved, best of `--repeats`: on a shared machine other work only ever slows a run down
            for _ in range(args.repeats):
                for name in servers:
                    latencies, errors = load(urls[name], args.seconds)
                    run = {"rate": len(latencies) / args.seconds, "errors": errors,
                           "p99": float(np.percentile(latencies, 99)) if latencies else float("nan")}
                    best = results.setdefault(name, {**run, "errors": 0})
                    best["errors"] += errors
                    if run["rate"] > best["rate"]:
                        best.update(rate=run["rate"], p99=run["p99"])
            for name in servers:
                results[name]["rss_growth"] = rss(servers[name].pid) / before[name] - 1
        finally:
            for server in servers.values():
                server.kill()
                server.wait(timeout=30)
    for name, r in results.items():
        print(f"{name}: {r['rate']:.1f} requests/s (best {args.seconds:g} s run of {args.repeats}) with {args.clients} "
              f"clients, max wait {args.max_wait_ms:g} ms, p99 "
              f"{1000 * r['p99']:.0f} ms, {r['errors']} errors, resident memory {100 * r['rss_growth']:+.1f} %")
    batched, unbatched = results["batched"], results["unbatched"]
    return {"bench": "serve", "clients": args.clients, "requests_per_s_batched": round(batched["rate"], 2),
            "requests_per_s_unbatched": round(unbatched["rate"], 2),
            "batching_gain": round(batched["rate"] / unbatched["rate"], 3), "p99_ms": round(1000 * batched["p99"], 1),
            "errors": batched["errors"] + unbatched["errors"], "rss_growth": round(batched["rss_growth"], 4)}


def data_build(args) -> dict:
    """Stage-2 records from a synthetic factory, and the builder's peak memory at 1x and 10x size."""
    from iadgpt.data.factory import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for scale in (1, 10):
            factory = Path(tmp) / f"factory{scale}"
            make_synthetic(factory, categories=args.categories * scale, seed=0, image_size=args.image_size,
                           train_normals=8, test_normals=2, test_anomalies_per_kind=1)
            result = Path(tmp) / f"build{scale}.json"
            subprocess.run([sys.executable, __file__, "data-build-worker", "--factory", str(factory),
                            "--records", str(args.records * scale), "--out", str(Path(tmp) / f"stage{scale}"),
                            "--result", str(result)], check=True)
            runs[scale] = json.loads(result.read_text())
            print(f"{scale:2d}x: {runs[scale]['records']} records from {args.categories * scale} categories in "
                  f"{runs[scale]['seconds']:.1f} s, peak RSS {runs[scale]['peak_rss_mib']:.0f} MiB")
    return {"bench": "data_build", "records_per_s": round(runs[10]["records"] / runs[10]["seconds"], 1),
            "rss_ratio_10x": round(runs[10]["peak_rss_mib"] / runs[1]["peak_rss_mib"], 3)}


def data_build_worker(args) -> None:
    import resource

    from iadgpt.data.builders import (DatasetSource, Stage2Options, SyntheticDefects, index_sources,
                                      stage2_records, stage_roots, write_stage)

    start = time.perf_counter()
    out = Path(args.out)
    sources = [DatasetSource.parse(f"factory=mvtec:{args.factory}")]
    pools = index_sources(sources)
    info = write_stage(out, 2, stage_roots(out, sources),
                       stage2_records(pools, SyntheticDefects(out / "synthetic", pools), Stage2Options(records=args.records), 0))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps({"records": info.num_records, "seconds": seconds, "peak_rss_mib": peak}))


def plan_step_worker(args) -> None:
    """What one training step holds, per process, for the memory planner to be checked against.

    Run under `accelerate launch` (configs/accelerate/*.yaml, from the repo root) or plain python:
    the training loop's own set-up (`iadgpt/training/loop.py`: build_accelerator, build_model,
    load_stage_data, RecordCollator, build_dataloader, build_optimizer, fill_deepspeed_sizes,
    accelerator.prepare), then two optimizer steps. At step 2 it measures the forward's saved
    activations (`SavedActivations`) and the state census (`training_state_census`) at up to three
    points: `census_backward_end` (DeepSpeed only: just before its gradient epilogue, reduce buckets
    and contiguous gradient buffers still allocated), `census_before_optimizer_step` (a step pre-hook
    on the torch optimizer: gradients reduced, the AdamW states of step 1 alive; DeepSpeed runs it
    inside accelerate's backward) and `census_after_backward` (right after `accelerator.backward`:
    under DeepSpeed after engine.step(), without it before optimizer.step()). Each rank writes
    `<out>.rank<r>.json`; rank 0 merges them into `--out`.
    """
    import resource
    from contextlib import nullcontext

    from iadgpt.config import load_config
    from iadgpt.training.collator import RecordCollator
    from iadgpt.training.config import TrainConfig
    from iadgpt.training.trainer import (StepBudget, build_accelerator, build_dataloader, build_model,
                                         build_optimizer, fill_deepspeed_sizes, load_stage_data)
    from iadgpt.utils.memory_census import SavedActivations, base_optimizer, training_state_census
    from iadgpt.utils.profiling import current_rss_mib

    cfg = load_config(TrainConfig, args.config, args.overrides)
    accelerator = build_accelerator(cfg)
    main_process = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model, processor = build_model(cfg, main_process)
    info, dataset, _ = load_stage_data(cfg, processor, main_process)
    collator = RecordCollator(processor, info, pixel_loss_on_normals=cfg.pixel_loss_on_normals)
    loader = build_dataloader(cfg, dataset, collator)
    steps = 2
    optimizer, scheduler = build_optimizer(cfg, model, StepBudget(max(steps, cfg.max_steps or steps)),
                                           accelerator.num_processes)
    fill_deepspeed_sizes(accelerator, model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    module = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}

    result: dict = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                    "zero_stage": zero.get("stage", 0), "deepspeed_zero_config": zero or None,
                    "gradient_checkpointing": cfg.gradient_checkpointing, "freeze_vision": cfg.freeze_vision,
                    "dtype": str(next(module.parameters()).dtype).removeprefix("torch.")}
    measuring = {"on": False}
    current: dict = {}

    def alive_beside_the_model() -> dict:
        """The step's batch and outputs, and the next batch accelerate's loader already holds (it
        iterates one batch ahead to know the end of the data)."""
        frame = getattr(current.get("batches"), "gi_frame", None)
        return {"batch": current["batch"], "outputs": current["output"],
                "next_batch": frame.f_locals.get("next_batch") if frame is not None else None}

    def before_optimizer_step(_optimizer, _args, _kwargs):
        if measuring["on"]:
            result["census_before_optimizer_step"] = training_state_census(
                model, optimizer, accelerator, extra=alive_beside_the_model())

    hook = base_optimizer(optimizer).register_step_pre_hook(before_optimizer_step)
    # DeepSpeed's gradient epilogue reduces the last bucket and then frees its reduce buckets: the
    # census just before it sees the gradient buffers of the backward at their fullest.
    zero_optimizer = getattr(model, "optimizer", None) if plugin is not None else None
    epilogue = getattr(zero_optimizer, "independent_gradient_partition_epilogue", None)
    if epilogue is not None:
        def epilogue_with_census(*args, **kwargs):
            if measuring["on"]:
                result["census_backward_end"] = training_state_census(
                    model, optimizer, accelerator, extra=alive_beside_the_model())
            return epilogue(*args, **kwargs)

        zero_optimizer.independent_gradient_partition_epilogue = epilogue_with_census
    model.train()
    step = 0
    while step < steps:
        current["batches"] = iter(loader)
        for batch in current["batches"]:
            with accelerator.accumulate(model):
                measuring["on"] = step == steps - 1 and accelerator.sync_gradients
                saved = SavedActivations(module) if measuring["on"] else nullcontext()
                with saved:
                    output = model(**batch)
                current.update(batch=batch, output=output)
                accelerator.backward(output.loss)
                if measuring["on"]:
                    result["census_after_backward"] = training_state_census(
                        model, optimizer, accelerator, extra=alive_beside_the_model())
                    result["activations"] = saved.summary()
                    result["batch"] = batch_shape(module, batch, output)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            measuring["on"] = False
            if accelerator.sync_gradients:
                step += 1
            if step >= steps:
                break
    hook.remove()
    result["rss_mib"] = current_rss_mib()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.rank{accelerator.process_index}.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    if main_process:
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(accelerator.num_processes)]
        out.write_text(json.dumps({"world_size": accelerator.num_processes, "ranks": ranks}, indent=1))
        for r in ranks:
            census = r["census_after_backward"]
            print(f"rank {r['rank']}: ZeRO-{r['zero_stage']} {r['dtype']}: " + ", ".join(
                f"{k} {v / 2**20:.2f} MiB" for k, v in census["parts"].items())
                  + f"; activations {r['activations']['bytes'] / 2**20:.2f} MiB; total_live "
                  f"{census['total_live'] / 2**20:.2f} MiB, unaccounted {census['unaccounted'] / 2**20:.3f} MiB")
    accelerator.end_training()


def batch_shape(model, batch: dict, output) -> dict:
    """The micro-batch's shape as a planner takes it: tokens (and those the language model ran on
    after exemplar compression), images with their grids and roles, labels, the pixel map."""
    from iadgpt.model.modeling_iadgpt import ROLE_EXEMPLAR, ROLE_OTHER, ROLE_QUERY

    input_ids = batch["input_ids"]
    kept = getattr(output, "kept_tokens", None)
    lm_tokens = kept.sum(-1) if kept is not None else batch["attention_mask"].sum(-1)
    merge = model.config.vision_config.spatial_merge_size ** 2
    grids = batch.get("image_grid_thw")
    grids = grids.tolist() if grids is not None else []
    roles = batch["image_roles"].tolist() if "image_roles" in batch else []
    names = {ROLE_EXEMPLAR: "exemplar", ROLE_QUERY: "query", ROLE_OTHER: "other"}
    masks = batch.get("pixel_masks") or []
    return {
        "batch_size": input_ids.shape[0],
        "input_ids_length": input_ids.shape[1],
        "tokens_per_sample": batch["attention_mask"].sum(-1).tolist(),
        "lm_sequence_length": int(lm_tokens.max()),
        "lm_tokens_per_sample": lm_tokens.tolist(),
        "images": [{"grid_thw": grid, "visual_tokens": grid[0] * grid[1] * grid[2] // merge,
                    "role": names.get(role, str(role)) if roles else None}
                   for grid, role in zip(grids, roles or [None] * len(grids))],
        "dummy_image": "dummy_pixel_values" in batch,
        "labels": int((batch["labels"] != -100).sum()),
        "pixel_map_requested": any(m is not None for m in masks),
        "mask_pixels": sum(m.numel() for m in masks if m is not None),
    }


def synthetic_stage3(folder: Path, categories: int, seed: int, records: int, shots: tuple[int, ...] | None = None) -> Path:
    """A synthetic factory of 112-px images in `folder`/factory and stage-3 records from it in `folder`/stage3."""
    from iadgpt.data.builders import DatasetSource, Stage3Options, index_sources, stage3_records, write_stage
    from iadgpt.data.factory import make_synthetic

    make_synthetic(folder / "factory", categories=categories, seed=seed, image_size=112, train_normals=8,
                   test_normals=2, test_anomalies_per_kind=1)
    source = DatasetSource.parse(f"factory=mvtec:{folder / 'factory'}")
    options = Stage3Options(records=records, **({"shots": shots} if shots else {}))
    write_stage(folder / "stage3", 3, {"factory": str(source.root)}, stage3_records(index_sources([source]), options, 0))
    return folder / "stage3"


def train_speed(args) -> dict:
    """Samples/s of the training recipe on the small preset under DeepSpeed ZeRO-2: 1 vs 2 CPU processes."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_stage3(tmp, categories=4, seed=0, records=400, shots=(2,))
        checkpoint = init_model(tmp / "small", args.preset)
        # Interleaved repeats, best of each: other work on a shared machine only ever slows a run down.
        speeds = {1: [], 2: []}
        for repeat in range(args.repeats):
            for processes in (1, 2):
                out = tmp / f"run{processes}-{repeat}"
                config = "cpu_1proc_zero2.yaml" if processes == 1 else "cpu_2proc_zero2.yaml"
                subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                str(repo / "configs" / "accelerate" / config), str(repo / "train" / "train.py"),
                                "--config", str(repo / "configs" / "stage3.yaml"), f"model={checkpoint}",
                                f"data={tmp / 'stage3'}", f"output_dir={out}", f"max_steps={args.steps}",
                                "global_batch_size=8", "per_device_batch_size=2", "mixed_precision=no",
                                "gradient_checkpointing=false", "num_workers=0", "save_every=100000"],
                               check=True, cwd=repo, capture_output=True)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                steady = statistics.median(row["samples_per_s"] for row in rows[2:])  # after start-up steps
                speeds[processes].append(steady)
                print(f"{processes} process(es), run {repeat + 1}: median {steady:.1f} samples/s over steps "
                      f"3-{len(rows)}, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
        speeds = {processes: max(values) for processes, values in speeds.items()}
    return {"bench": "train", "samples_per_s_1proc": round(speeds[1], 2), "samples_per_s_2proc": round(speeds[2], 2),
            "scaling": round(speeds[2] / speeds[1], 3)}


PLAN_CASES = {"none": None, "zero2": "cpu_2proc_zero2.yaml", "zero3": "cpu_2proc_zero3.yaml"}


def plan_check(args) -> dict:
    """`iadgpt plan`'s parts against what a real training step holds: for each preset (tiny, small,
    the 3B at its released widths and reduced depth) under no DeepSpeed (1 process) and ZeRO-2 / ZeRO-3
    (2 processes), one `plan-step` run of the shipped stage-3 recipe, then the planner's weights,
    gradients, optimizer states, DeepSpeed buffers and saved activations for the same step
    (`iadgpt.planning.check`), every process compared."""
    from iadgpt.config import load_config
    from iadgpt.planning.check import STATE_PARTS, compare
    from iadgpt.training.config import TrainConfig

    repo = Path(__file__).resolve().parents[1]
    stage_config = repo / "configs" / "stage3.yaml"
    cfg = load_config(TrainConfig, stage_config)
    errors = {"states": 0.0, "activations": 0.0, "deepspeed_buffers": 0.0}
    cases = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_stage3(tmp, categories=3, seed=3, records=24)
        print(f"{'case':<24}{'rank':>5}  " + "  ".join(f"{p:>28}" for p in (*STATE_PARTS, "deepspeed_buffers",
                                                                           "activations")))
        for preset in args.presets:
            checkpoint = init_model(tmp / preset, preset)
            for mode in args.modes:
                out = tmp / f"{preset}-{mode}.json"
                worker = [str(repo / "eval" / "speed.py"), "plan-step", "--config", str(stage_config), "--out", str(out),
                          f"model={checkpoint}", f"data={tmp / 'stage3'}", f"output_dir={tmp / 'run'}",
                          "per_device_batch_size=1", "num_workers=0", "max_steps=2", "min_pixels=3136",
                          f"max_pixels={112 * 112}"]
                if PLAN_CASES[mode] is None:
                    command = [sys.executable, *worker, "global_batch_size=1", "mixed_precision=no"]
                else:
                    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(repo / "configs" / "accelerate" / PLAN_CASES[mode]), *worker, "global_batch_size=2"]
                done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"plan-step {preset} {mode} failed:\n{done.stderr[-3000:]}")
                cases += 1
                for rank in json.loads(out.read_text())["ranks"]:
                    parts = compare(checkpoint, cfg, rank)
                    errors["states"] = max(errors["states"], *(parts[p]["rel_error"] for p in STATE_PARTS))
                    errors["activations"] = max(errors["activations"], parts["activations"]["rel_error"])
                    if "deepspeed_buffers" in parts:
                        errors["deepspeed_buffers"] = max(errors["deepspeed_buffers"],
                                                          parts["deepspeed_buffers"]["rel_error"])
                    cells = [f"{parts[p]['planned'] / 2**20:9.2f}/{parts[p]['measured'] / 2**20:9.2f} MiB "
                             f"{parts[p]['rel_error']:5.3f}" if p in parts else f"{'-':>28}"
                             for p in (*STATE_PARTS, "deepspeed_buffers", "activations")]
                    print(f"{preset + ' ' + mode:<24}{rank['rank']:>5}  " + "  ".join(cells), flush=True)
    print("cells: planned/measured, relative error; states at the optimizer step, DeepSpeed buffers at the end "
          f"of backward (the fullest process planned; max error {errors['deepspeed_buffers']:.3f})")
    return {"bench": "plan", "cases": cases, "max_rel_error_states": round(errors["states"], 4),
            "max_rel_error_activations": round(errors["activations"], 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in ("compression", "pixel-map", "pixel-map-worker", "eval", "prefix-cache", "chat", "serve",
                 "data-build", "data-build-worker", "train", "plan", "plan-step"):
        p = sub.add_parser(name)
        p.add_argument("--shots", type=int, default=4, help="normal exemplars before the query")
        p.add_argument("--image-size", type=int, default=504, help="image side in pixels (504 -> 324 tokens)")
        p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported) after one warm-up")
        if name == "compression":
            p.add_argument("--retention", type=float, default=0.2, help="exemplar token retention")
        if name == "pixel-map-worker":
            p.add_argument("--variant", choices=("ours", "eager"), required=True)
            p.add_argument("--checkpoint", required=True)
            p.add_argument("--result", required=True)
        if name == "eval":
            p.set_defaults(image_size=224, repeats=3)  # 224 px: 64 visual tokens per image
            p.add_argument("--queries", type=int, default=16, help="query images scored by each variant")
            p.add_argument("--batch-size", type=int, default=4, help="queries per forward / generate call")
            p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer (forced)")
            p.add_argument("--preset", default="bench",
                           help="bench (BENCH_PRESET, the default) or an init-model preset (small, tiny)")
        if name == "prefix-cache":
            p.add_argument("--queries", type=int, default=32, help="queries of the one product")
            p.add_argument("--batch-size", type=int, default=4, help="queries per forward")
            p.add_argument("--shot-counts", type=int, nargs="+", default=[1, 2, 4], help="reference counts k")
        if name == "chat":
            p.add_argument("--turns", type=int, default=5, choices=range(2, 6), help="turns; the last is timed")
            p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer (forced)")
        if name == "serve":
            p.set_defaults(image_size=112, repeats=2)
            p.add_argument("--clients", type=int, default=8, help="concurrent clients")
            p.add_argument("--seconds", type=float, default=20.0, help="length of each timed run")
            p.add_argument("--max-wait-ms", type=float, help="the batched server's wait for company (default: the "
                                                              "service's own, ServeSettings.max_wait_ms)")
        if name == "data-build":
            p.set_defaults(image_size=96)
            p.add_argument("--categories", type=int, default=4, help="categories of the 1x factory (10x: ten times)")
            p.add_argument("--records", type=int, default=150, help="stage-2 records of the 1x build")
        if name == "data-build-worker":
            p.add_argument("--factory", required=True)
            p.add_argument("--records", type=int, required=True)
            p.add_argument("--out", required=True)
            p.add_argument("--result", required=True)
        if name == "train":
            p.set_defaults(repeats=2)
            p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (8 samples each)")
            p.add_argument("--preset", default="small", help="init-model preset")
        if name == "plan":
            p.add_argument("--presets", nargs="+", default=["tiny", "small", "qwen2.5-vl-3b"],
                           help="init-model presets, at their default (reduced) depth")
            p.add_argument("--modes", nargs="+", choices=tuple(PLAN_CASES), default=list(PLAN_CASES))
        if name == "plan-step":
            p.add_argument("--config", required=True, help="stage YAML (configs/stage3.yaml ...)")
            p.add_argument("--out", required=True, help="merged JSON (each rank also writes <out>.rank<r>.json)")
            p.add_argument("overrides", nargs="*", help="key=value settings of the TrainConfig")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.bench == "pixel-map-worker":
        return pixel_map_worker(args)
    if args.bench == "data-build-worker":
        return data_build_worker(args)
    if args.bench == "plan-step":
        return plan_step_worker(args)
    result = {"compression": compression, "pixel-map": pixel_map, "eval": eval_speed, "prefix-cache": prefix_cache, "chat": chat_speed, "serve": serve_load,
              "data-build": data_build, "train": train_speed, "plan": plan_check}[args.bench](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
