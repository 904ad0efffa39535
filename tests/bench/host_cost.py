"""Host cost per model call: ComfyUI's unpatched call vs. CAT's pruned call, block_math "modules" vs "lean".

The models keep their real depth (SD3-medium: 24 joint blocks; Flux-dev: 19 double + 38 single)
and by default their real token counts, but are cut to a tiny width (default 64: one attention
head), so what is left of a call is mostly the Python and dispatch work around the math: the
part of a pruned step that a faster GPU does not shrink. Per call it counts the aten ops
dispatched (independent of the token count) and times the call (median after warm-up). On a
CPU that time is wall time, math included, and attention over thousands of tokens is not
negligible even at width 64: cut the tokens (--tokens, --txt-tokens) to see the host cost.
All cases share one model, one set of inputs and this one process; their repeats are
interleaved. One JSON line per (model, case), then a summary line with the ratios to the
unpatched call. Examples:

  # real token counts (on a CPU mostly attention math)
  COMFYUI_PATH=... python tests/bench/host_cost.py --repeats 3
  # host cost on a CPU: so few tokens that the math is negligible
  COMFYUI_PATH=... python tests/bench/host_cost.py --tokens 16 --txt-tokens 4 --repeats 15 --threads 1
  # the most frequent aten ops per case, Flux at its detected head size
  COMFYUI_PATH=... python tests/bench/host_cost.py --models flux-dev --width 128 --op-breakdown 10
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _host import (build_flux, build_sd3, device_name, setup, synchronize, ADM_DIM, CONTEXT_DIM, FLUX_CONTEXT_DIM,
                   FLUX_VEC_DIM)

# Per model: text tokens and model batch of a real call (SD3: CFG => cond + uncond rows in one call;
# Flux-dev: guidance-distilled, one row).
MODELS = {
    "sd3-medium": dict(txt_tokens=154, batch=2),
    "flux-dev": dict(txt_tokens=512, batch=1),
}
CASES = (("unpatched", None), ("pruned_modules", "modules"), ("pruned_lean", "lean"))
DENSE_CASES = (("dense", True), ("dense_hooked", False))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--width", type=int, default=64, help="hidden size: SD3 a multiple of 64 (its head size), "
                   "Flux a multiple of 128 or 32 / 64 / 96 (one head); default 64, one head")
    p.add_argument("--tokens", type=int, default=4096, help="image tokens, a square number (default: 1024 px images)")
    p.add_argument("--txt-tokens", type=int, default=None, help="text tokens (default: the real 154 / 512)")
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="pytorch", choices=["pytorch", "comfy-default"],
                   help="pytorch: ComfyUI's --use-pytorch-cross-attention (its CUDA default); "
                        "comfy-default: what ComfyUI picks on this device (sub-quadratic on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--op-breakdown", type=int, default=0, metavar="K", help="add the K most frequent aten ops per case")
    args = p.parse_args()
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        p.error(f"--tokens must be a square number (a square latent), got {args.tokens}")
    return args


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active: each costs the host one dispatch, whatever its size."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def model_inputs(name, batch, img_tokens, txt_tokens, device, dtype):
    """Latent, sigma and the conditioning kwargs apply_model gets from ComfyUI's conds for this model."""
    side = 2 * math.isqrt(img_tokens)  # patch 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, side, side, generator=gen).to(device)
    sigma = torch.full((batch,), 0.6, device=device)
    if name == "sd3-medium":
        conds = dict(c_crossattn=torch.randn(batch, txt_tokens, CONTEXT_DIM, generator=gen),
                     y=torch.randn(batch, ADM_DIM, generator=gen))
    else:  # model_base.Flux.extra_conds: T5 context, CLIP pooled vector, distilled guidance
        conds = dict(c_crossattn=torch.randn(batch, txt_tokens, FLUX_CONTEXT_DIM, generator=gen),
                     y=torch.randn(batch, FLUX_VEC_DIM, generator=gen), guidance=torch.full((batch,), 3.5))
    return x, sigma, {k: v.to(device, dtype) for k, v in conds.items()}


def pruned_options(c, pack, patcher, settings, batch):
    """transformer_options that make apply_model a CAT call of its own PruningRun (as in a sampler run)."""
    patch = pack.nodes.patch
    patched = patch.apply_cat(patcher, settings)
    holder = patch.holder_of(patched)
    apply_model = c.patcher_extension.WrappersMP.APPLY_MODEL
    options = {"patches_replace": patched.model_options["transformer_options"]["patches_replace"],
               "wrappers": {apply_model: patched.wrappers[apply_model]},
               "uuids": [f"chunk{i}" for i in range(batch)], "cond_or_uncond": [1, 0][:batch], patch.HOLDER_KEY: holder}
    run = options[patch.RUN_KEY] = pack.cat_core.PruningRun(holder.settings, holder.info)
    return options, run


def bench_model(c, pack, name, args, device, dtype):
    spec = MODELS[name]
    width = args.width
    batch, txt_tokens = spec["batch"], args.txt_tokens or spec["txt_tokens"]
    if name == "sd3-medium":
        patcher = build_sd3(name, depth=None, width=width, dtype=dtype)
        blocks = len(patcher.model.diffusion_model.joint_blocks)
        depth_text = f"{blocks} joint"
        heads = patcher.model.diffusion_model.joint_blocks[0].x_block.attn.num_heads
    else:
        patcher = build_flux(width=width, dtype=dtype)
        dm = patcher.model.diffusion_model
        blocks = len(dm.double_blocks) + len(dm.single_blocks)
        depth_text = f"{len(dm.double_blocks)} double + {len(dm.single_blocks)} single"
        heads = dm.num_heads
    base = patcher.model
    x, sigma, conds = model_inputs(name, batch, args.tokens, txt_tokens, device, dtype)

    def call(options):
        with torch.inference_mode():
            return base.apply_model(x, sigma, transformer_options=options, **conds)

    cases, capture_macs = {}, {}
    for case, block_math in CASES:
        if block_math is None:
            cases[case] = (lambda: call({}), None)
            continue
        settings = pack.cat_core.CATSettings(keep_ratio=args.keep, warmup_steps=1, block_math=block_math)
        options, run = pruned_options(c, pack, patcher, settings, batch)
        call(options)  # step 0 = the capture step: fills the caches and picks the first selection
        run.on_step_end(0)  # from here on every call of this run is a pruned call
        capture_macs[case] = (run.stats.ledger.total_computed, run.stats.ledger.total_dense)
        cases[case] = ((lambda options=options: call(options)), run)
    # Dense calls of a patched model (warm-up / cool-down): after the first, measured one, without
    # CAT's block hooks; "dense_hooked" keeps the hooks on every call (the behaviour before 0.3.0).
    for case, skip_hooks in DENSE_CASES:
        options, run = pruned_options(c, pack, patcher, pack.cat_core.CATSettings(warmup_steps=1000), batch)
        if not skip_hooks:
            run.can_skip_hooks = lambda ctx: False
        call(options)
        capture_macs[case] = (run.stats.ledger.total_computed, run.stats.ledger.total_dense)
        cases[case] = ((lambda options=options: call(options)), run)

    for _ in range(args.warmup):
        for fn, _run in cases.values():
            fn()
    counters = {}
    for case, (fn, _run) in cases.items():
        with OpCounter() as counter:
            fn()
        counters[case] = counter.ops
    synchronize(device)
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, (fn, _run) in cases.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[case].append((time.perf_counter() - start) * 1000)

    rows = {}
    for case, (fn, run) in cases.items():
        mode = None
        if run is not None:
            modes = [record.mode for record in run.stats.calls]
            mode = "dense" if case in dict(DENSE_CASES) else "pruned"
            expected = {mode} if mode == "dense" else {"pruned"}
            if (mode == "pruned" and modes[0] != "capture") or set(modes[1:]) != expected:
                raise RuntimeError(f"{name} {case}: expected only {mode} calls after the first, got {modes}")
            computed = run.stats.ledger.total_computed - capture_macs[case][0]
            dense = run.stats.ledger.total_dense - capture_macs[case][1]
        rows[case] = {
            "bench": "host_cost", "model": name, "case": case, "call_mode": mode, "device": device_name(device),
            "attention": pack.nodes.patch.comfy_mmdit.optimized_attention.__name__, "dtype": str(dtype).replace("torch.", ""),
            "depth": blocks, "blocks": depth_text, "width": width, "heads": heads, "head_dim": width // heads, "img_tokens": args.tokens,
            "txt_tokens": txt_tokens, "batch": batch, "keep": None if mode != "pruned" else args.keep,
            "aten_ops": sum(counters[case].values()), "host_ms": round(_median(times[case]), 2),
            "macs_saved": None if mode != "pruned" else round(1 - computed / dense, 4),
        }
        if args.op_breakdown:
            rows[case]["top_ops"] = {str(op): n for op, n in counters[case].most_common(args.op_breakdown)}
        if run is not None:
            run.finish()
    base_row = rows["unpatched"]
    for row in rows.values():
        row["vs_unpatched"] = round(row["host_ms"] / base_row["host_ms"], 3)
        row["ops_vs_unpatched"] = round(row["aten_ops"] / base_row["aten_ops"], 3)
        print(json.dumps(row), flush=True)
    return {case: {"host": row["vs_unpatched"], "ops": row["ops_vs_unpatched"]} for case, row in rows.items() if case != "unpatched"}


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main():
    started = time.perf_counter()
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c, pack = setup(pytorch_attention=args.attention == "pytorch")
    from comfy import model_management

    device = model_management.get_torch_device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    ratios = {}
    for name in args.models:
        ratios[name] = bench_model(c, pack, name, args, device, dtype)
        model_management.unload_all_models()
        model_management.soft_empty_cache()
    print(json.dumps({"bench": "host_cost_summary", "keep": args.keep, "repeats": args.repeats, "img_tokens": args.tokens,
                      "ratios_to_unpatched": ratios, "wall_s": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
