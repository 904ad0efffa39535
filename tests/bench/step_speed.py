"""Per-step (and optionally whole-run) speed of ComfyUI's unpatched SD3 vs. the CAT-pruned one.

Both run in this one process on the same model object, random weights at real shapes.
One JSON line per case. Examples:

  # smallest CPU setting (a few minutes on 2 cores)
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium --depth 4 --res 256 --repeats 3
  # the issue's GPU settings
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium sd35-large --res 1024 1536
  COMFYUI_PATH=... python tests/bench/step_speed.py --models sd3-medium --res 1024 --sampler-run --steps 28 50
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _host import build_sd3, device_name, median_ms, setup, synchronize, CONTEXT_DIM, ADM_DIM


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd3-medium"], choices=["sd3-medium", "sd35-large", "sd35-medium"])
    p.add_argument("--depth", type=int, default=None, help="override the depth (smaller = faster, for CPU runs)")
    p.add_argument("--res", nargs="+", type=int, default=[1024], help="image sizes in pixels (latent = res/8)")
    p.add_argument("--batch", type=int, default=2, help="model batch (2 = one image with CFG)")
    p.add_argument("--txt", type=int, default=154, help="text tokens")
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.3])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--sampler-run", action="store_true", help="also time whole sampler runs end to end")
    p.add_argument("--steps", nargs="+", type=int, default=[28, 50])
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--cooldown-steps", type=int, default=1, help="full steps at the end of sampler runs (the pack's default: 1)")
    return p.parse_args()


def main():
    args = parse_args()
    c, pack = setup()
    from comfy import model_management

    device = model_management.get_torch_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    CATSettings = pack.cat_core.CATSettings
    patch = pack.nodes.patch

    for name in args.models:
        model = build_sd3(name, depth=args.depth, dtype=dtype)
        base = model.model
        for res in args.res:
            h = w = res // 8
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, 16, h, w, generator=gen).to(device)
            sigma = torch.full((args.batch,), 0.6, device=device)
            context = torch.randn(args.batch, args.txt, CONTEXT_DIM, generator=gen).to(device, dtype)
            y = torch.randn(args.batch, ADM_DIM, generator=gen).to(device, dtype)

            def call(options):
                with torch.inference_mode():
                    return base.apply_model(x, sigma, c_crossattn=context, y=y, transformer_options=options)

            full_ms = median_ms(lambda: call({}), device, args.repeats)
            for keep in args.keep:
                patched = patch.apply_cat(model, CATSettings(keep_ratio=keep, warmup_steps=1))
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
                pruned_ms = median_ms(lambda: call(options), device, args.repeats)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                stats = run.finish()
                print(json.dumps({
                    "bench": "step", "model": name, "depth": base.diffusion_model.depth, "res": res, "tokens": (h // 2) * (w // 2),
                    "batch": args.batch, "txt": args.txt, "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
                    "keep": keep, "full_ms": round(full_ms, 2), "pruned_ms": round(pruned_ms, 2), "speedup": round(full_ms / pruned_ms, 3),
                    "macs_saved_per_pruned_step": round(1 - (stats.ledger.total_computed - capture_computed) / (stats.ledger.total_dense - capture_dense), 4),
                    "cache_mib": round(stats.peak_cache_bytes / 2**20, 1), "peak_mib": None if peak is None else round(peak, 1),
                }), flush=True)
            if args.sampler_run:
                sampler_runs(c, pack, model, name, res, args, device)
        del model
        model_management.unload_all_models()
        model_management.soft_empty_cache()


def sampler_runs(c, pack, model, name, res, args, device):
    """Whole KSampler runs (euler, cfg 5, batch 1 => model batch 2), unpatched vs patched."""
    import comfy.sample

    gen = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, args.txt, CONTEXT_DIM, generator=gen)
    cond = [[ctx, {"pooled_output": torch.randn(1, ADM_DIM, generator=gen)}]]
    uncond = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros(1, ADM_DIM)}]]
    latent = torch.zeros(1, 16, res // 8, res // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    for steps in args.steps:
        for keep in args.keep:
            if keep == 1.0:
                continue
            patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=args.warmup_steps,
                                                                                  cooldown_steps=args.cooldown_steps))
            timings = {}
            for label, m in (("full", model), ("patched", patched), ("full2", model), ("patched2", patched)):
                synchronize(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    comfy.sample.sample(m, noise, steps, 5.0, "euler", "simple", cond, uncond, latent, disable_pbar=True, seed=0)
                synchronize(device)
                timings[label] = time.perf_counter() - start
            full = min(timings["full"], timings["full2"])
            pruned = min(timings["patched"], timings["patched2"])
            stats = pack.nodes.patch.holder_of(patched).last_stats
            print(json.dumps({
                "bench": "sampler_run", "model": name, "res": res, "steps": steps, "warmup_steps": args.warmup_steps,
                "cooldown_steps": args.cooldown_steps, "keep": keep,
                "device": device_name(device), "full_s": round(full, 3), "patched_s": round(pruned, 3), "speedup": round(full / pruned, 3),
                "macs_saved": round(stats.ledger.saved_fraction(), 4), "cache_mib": round(stats.peak_cache_bytes / 2**20, 1),
            }), flush=True)


if __name__ == "__main__":
    main()
