"""Per-step (and optionally whole-run) speed of ComfyUI's unpatched SD3 / Flux vs. the CAT-pruned one.

Both run in this one process on the same model object, random weights at real shapes.
One JSON line per case: wall time per call, with the host's share (the time to enqueue the
call, before waiting for the device) and, on CUDA, the device's own time (CUDA events).
`--execution eager graph` times pruned calls eager and replayed from CUDA graphs (graph needs
CUDA: on a CPU those rows are skipped with a message). Examples:

  # smallest CPU setting (a few minutes on 2 cores)
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium --depth 4 --res 256 --repeats 3
  # the issue's GPU settings
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium sd35-large --res 1024 1536
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium --res 1024 --sampler-run --steps 28 50
  # the GPU measurement of issue 15: eager and graph, SD3-medium batch 2, SD3.5-large, Flux-dev batch 1
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium sd35-large --res 1024 --keep 0.3 --execution eager graph
  COMFYUI_PATH=... python tests/bench/step_speed.py --models flux-dev --res 1024 --keep 0.3 --execution eager graph
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _host import (build_flux, build_sd3, device_name, setup, synchronize, ADM_DIM, CONTEXT_DIM, FLUX_CONTEXT_DIM,
                   FLUX_VEC_DIM)

FLUX = "flux-dev"  # 19 double + 38 single blocks, width 3072, T5 512 tokens, no CFG (batch 1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd3-medium"], choices=["sd3-medium", "sd35-large", "sd35-medium", FLUX])
    p.add_argument("--depth", type=int, default=None,
                   help="override the depth (smaller = faster, for CPU runs); Flux: double blocks, with twice as many single")
    p.add_argument("--flux-width", type=int, default=3072, help="Flux hidden size (3072 = Flux-dev; 128 for CPU runs)")
    p.add_argument("--res", nargs="+", type=int, default=[1024], help="image sizes in pixels (latent = res/8)")
    p.add_argument("--batch", type=int, default=None, help="model batch (default: 2 = one image with CFG; Flux-dev 1)")
    p.add_argument("--txt", type=int, default=None, help="text tokens (default: 154; Flux-dev 512)")
    p.add_argument("--execution", nargs="+", default=["eager"], choices=["eager", "graph"],
                   help="how pruned calls are launched (the execution setting); graph needs CUDA")
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.3])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--sampler-run", action="store_true", help="also time whole sampler runs end to end")
    p.add_argument("--steps", nargs="+", type=int, default=[28, 50])
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--cooldown-steps", type=int, default=1, help="full steps at the end of sampler runs (the pack's default: 1)")
    return p.parse_args()


def timed(fn, device, repeats: int, warmup: int = 2) -> dict:
    """Medians over `repeats` calls: wall ms, host ms (until fn returns, before waiting for the
    device) and, on CUDA, the device's ms between events around the call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, host, gpu = [], [], []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1000)
        if device.type == "cuda":
            end.record()
        synchronize(device)
        wall.append((time.perf_counter() - start) * 1000)
        if device.type == "cuda":
            gpu.append(begin.elapsed_time(end))
    med = lambda v: round(sorted(v)[len(v) // 2], 2) if v else None  # noqa: E731
    return {"ms": med(wall), "host_ms": med(host), "gpu_ms": med(gpu)}


def model_inputs(name, batch, txt, h, w, device, dtype):
    """apply_model's conditioning kwargs for this model (what ComfyUI's conds give it)."""
    gen = torch.Generator().manual_seed(0)
    if name == FLUX:  # model_base.Flux.extra_conds: T5 context, CLIP pooled vector, distilled guidance
        conds = dict(c_crossattn=torch.randn(batch, txt, FLUX_CONTEXT_DIM, generator=gen),
                     y=torch.randn(batch, FLUX_VEC_DIM, generator=gen), guidance=torch.full((batch,), 3.5))
    else:
        conds = dict(c_crossattn=torch.randn(batch, txt, CONTEXT_DIM, generator=gen), y=torch.randn(batch, ADM_DIM, generator=gen))
    x = torch.randn(batch, 16, h, w, generator=gen).to(device)
    return x, {k: v.to(device, dtype) for k, v in conds.items()}


def main():
    args = parse_args()
    c, pack = setup()
    from comfy import model_management

    device = model_management.get_torch_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    CATSettings = pack.cat_core.CATSettings
    patch = pack.nodes.patch
    graph_unsupported = pack.cat_core.graph.CAPTURE.unsupported(device)
    executions = list(dict.fromkeys(args.execution))
    if "graph" in executions and graph_unsupported is not None:
        print(f"step_speed: skipping execution graph: graph replay {graph_unsupported}", file=sys.stderr, flush=True)

    for name in args.models:
        if name == FLUX:
            depth = args.depth or 19
            model = build_flux(double=depth, single=2 * depth, width=args.flux_width, dtype=dtype)
            depth_text = f"{depth} double + {2 * depth} single"
        else:
            model = build_sd3(name, depth=args.depth, dtype=dtype)
            depth_text = f"{model.model.diffusion_model.depth} joint"
        batch = args.batch or (1 if name == FLUX else 2)
        txt = args.txt or (512 if name == FLUX else 154)
        base = model.model
        for res in args.res:
            h = w = res // 8
            x, conds = model_inputs(name, batch, txt, h, w, device, dtype)
            sigma = torch.full((batch,), 0.6, device=device)

            def call(options):
                with torch.inference_mode():
                    return base.apply_model(x, sigma, transformer_options=options, **conds)

            full = timed(lambda: call({}), device, args.repeats)
            for keep in args.keep:
                second_eager = None
                for execution in executions:
                    row = {"bench": "step", "model": name, "depth": depth_text, "res": res, "tokens": (h // 2) * (w // 2),
                           "batch": batch, "txt": txt, "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
                           "keep": keep, "execution": execution}
                    if execution == "graph" and graph_unsupported is not None:
                        print(json.dumps({**row, "skipped": f"graph replay {graph_unsupported}"}), flush=True)
                        continue
                    patched = patch.apply_cat(model, CATSettings(keep_ratio=keep, warmup_steps=1, execution=execution))
                    options = patched.model_options["transformer_options"]
                    apply_model = c.patcher_extension.WrappersMP.APPLY_MODEL
                    holder = patch.holder_of(patched)
                    options = {"patches_replace": options["patches_replace"], "wrappers": {apply_model: patched.wrappers[apply_model]},
                               "uuids": ["bench"], patch.HOLDER_KEY: holder}
                    run = options[patch.RUN_KEY] = pack.cat_core.PruningRun(holder.settings, holder.info)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    call(options)  # capture: fills the caches and the first selection
                    run.on_step_end(0)
                    capture_computed, capture_dense = run.stats.ledger.total_computed, run.stats.ledger.total_dense
                    call(options)  # the first pruned call (graph: captured, checked, the eager result)
                    second = call(options).float()  # graph: the first replay, on the same selection as eager's
                    if execution == "eager":
                        second_eager = second
                    elif second_eager is not None:
                        row["max_abs_diff_vs_eager"] = float((second - second_eager).abs().max())
                    pruned = timed(lambda: call(options), device, args.repeats)
                    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                    stats = run.finish()
                    if keep < 1.0 and execution == "graph" and not stats.execution.get("replayed"):
                        row["note"] = "; ".join(stats.notes) or "no call was replayed"
                    row.update({
                        "full_ms": full["ms"], "full_host_ms": full["host_ms"], "full_gpu_ms": full["gpu_ms"],
                        "pruned_ms": pruned["ms"], "pruned_host_ms": pruned["host_ms"], "pruned_gpu_ms": pruned["gpu_ms"],
                        "speedup": round(full["ms"] / pruned["ms"], 3),
                        "macs_saved_per_pruned_step": round(1 - (stats.ledger.total_computed - capture_computed) / (stats.ledger.total_dense - capture_dense), 4),
                        "replayed_calls": stats.execution.get("replayed", 0),
                        "cache_mib": round(stats.peak_cache_bytes / 2**20, 1), "peak_mib": None if peak is None else round(peak, 1),
                    })
                    print(json.dumps(row), flush=True)
            if args.sampler_run:
                sampler_runs(c, pack, model, name, res, args, device, batch, txt, executions, graph_unsupported)
        del model
        model_management.unload_all_models()
        model_management.soft_empty_cache()


def sampler_runs(c, pack, model, name, res, args, device, batch, txt, executions, graph_unsupported):
    """Whole KSampler runs (euler; SD3: cfg 5, batch 1 => model batch 2; Flux: cfg 1), unpatched vs patched."""
    import comfy.sample

    gen = torch.Generator().manual_seed(1)
    flux = name == FLUX
    ctx = torch.randn(1, txt, FLUX_CONTEXT_DIM if flux else CONTEXT_DIM, generator=gen)
    pooled = torch.randn(1, FLUX_VEC_DIM if flux else ADM_DIM, generator=gen)
    cond = [[ctx, {"pooled_output": pooled, **({"guidance": 3.5} if flux else {})}]]
    uncond = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(pooled)}]]
    cfg = 1.0 if flux else 5.0
    latent = torch.zeros(1, 16, res // 8, res // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    for steps in args.steps:
        for keep in args.keep:
            if keep == 1.0:
                continue
            for execution in executions:
                if execution == "graph" and graph_unsupported is not None:
                    continue
                patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(
                    keep_ratio=keep, warmup_steps=args.warmup_steps, cooldown_steps=args.cooldown_steps, execution=execution))
                timings = {}
                for label, m in (("full", model), ("patched", patched), ("full2", model), ("patched2", patched)):
                    synchronize(device)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", cond, uncond, latent, disable_pbar=True, seed=0)
                    synchronize(device)
                    timings[label] = time.perf_counter() - start
                full = min(timings["full"], timings["full2"])
                pruned = min(timings["patched"], timings["patched2"])
                stats = pack.nodes.patch.holder_of(patched).last_stats
                print(json.dumps({
                    "bench": "sampler_run", "model": name, "res": res, "steps": steps, "warmup_steps": args.warmup_steps,
                    "cooldown_steps": args.cooldown_steps, "keep": keep, "execution": execution,
                    "device": device_name(device), "full_s": round(full, 3), "patched_s": round(pruned, 3), "speedup": round(full / pruned, 3),
                    "macs_saved": round(stats.ledger.saved_fraction(), 4), "cache_mib": round(stats.peak_cache_bytes / 2**20, 1),
                    "replayed_calls": stats.execution.get("replayed", 0), "notes": stats.notes,
                }), flush=True)


if __name__ == "__main__":
    main()
