"""Quality of CAT Pruning against the unpatched model on the trained tiny SD3 fixture.

Samples through ComfyUI's own path (UNETLoader's loader, comfy.sample.sample = KSampler) with
and without the patch, same seeds, decodes with the fixture's linear VAE, and prints one JSON
line per setting: PSNR/SSIM against the unpatched image of the same seed, MACs saved, and time.
Writes a side-by-side PNG (rows: prompts; columns: unpatched, then each setting).

  COMFYUI_PATH=... python tests/bench/quality.py                       # paper defaults, 8 prompts
  COMFYUI_PATH=... python tests/bench/quality.py --keep 0.5 0.3 0.2 --selection cat random --lazycache 0.2 0.5
  COMFYUI_PATH=... python tests/bench/quality.py --seeds 0 1 2 --refresh-first-block 1 0   # ablation
  COMFYUI_PATH=... python tests/bench/quality.py --model pixart --seeds 0 1 2 --selection cat random   # PixArt-Σ fixture
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _host import REPO_ROOT, setup

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "tiny_sd3_t2i.safetensors"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="how many of the fixture's EVAL_PROMPTS")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg", type=float, default=None, help="default 5.0 (SD3), 4.5 (pixart)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default=None, help='default "simple" (SD3), "normal" (pixart)')
    p.add_argument("--res", type=int, default=None, help="image size in pixels (default: the fixture's, SD3 256, pixart 512)")
    p.add_argument("--keep", nargs="+", type=float, default=[0.3])
    p.add_argument("--warmup", nargs="+", type=int, default=[8])
    p.add_argument("--cooldown", nargs="+", type=int, default=[1], help="full steps at the end (0: the paper's schedule)")
    p.add_argument("--clusters", nargs="+", type=int, default=[20])
    p.add_argument("--stale-share", nargs="+", type=float, default=[0.5])
    p.add_argument("--ranking", nargs="+", default=["predicted_error"], choices=["predicted_error", "reference_drift"],
                   help="how the drift share ranks tokens (reference_drift: the paper's, the default before 0.5.0)")
    p.add_argument("--extrapolation", nargs="+", type=float, default=[0.5],
                   help="share of its last change per call a stale token's output is carried on by (0: the cached output, before 0.5.1)")
    p.add_argument("--selection", nargs="+", default=["cat"], choices=["cat", "random"])
    p.add_argument("--refresh-first-block", nargs="+", type=int, default=[1], choices=[0, 1],
                   help="1: the first block refreshes every token's keys/values (default); 0: off (ablation)")
    p.add_argument("--cache-space", nargs="+", default=["velocity"], choices=["velocity", "denoised", "auto"],
                   help="what the output cache holds for reused tokens")
    p.add_argument("--reuse", nargs="+", type=float, default=[0.0],
                   help="reuse_threshold: skip pruned-phase calls predicted to change less than this (0: off)")
    p.add_argument("--max-reuses", nargs="+", type=int, default=[2], help="max_reuses_in_row")
    p.add_argument("--prune-any-sampler", type=int, default=0, choices=[0, 1],
                   help="1: prune whatever the sampler (to measure samplers CAT leaves unpruned by default)")
    p.add_argument("--lazycache", nargs="*", type=float, default=[], help="also run ComfyUI's LazyCache at these thresholds")
    p.add_argument("--model", default=str(FIXTURE),
                   help='diffusion model file (default: the trained SD3 fixture), or "pixart": the trained PixArt-Σ fixture')
    p.add_argument("--out", default=str(REPO_ROOT / "bench_out" / "quality.png"))
    return p.parse_args()


def main():
    args = parse_args()
    c, pack = setup()
    import comfy.sample
    import comfy.sd
    from tests.fixtures import tiny_t2i

    metrics = importlib.import_module(pack.__name__ + ".cat_core.metrics")
    pixart = args.model == "pixart"
    args.cfg = args.cfg if args.cfg is not None else 4.5 if pixart else 5.0
    args.scheduler = args.scheduler or ("normal" if pixart else "simple")
    args.res = args.res or (512 if pixart else 256)
    if pixart:  # PixArt-Σ fixture: 4-channel SDXL-format latents, text features only
        from tests.fixtures import tiny_pixart
        from tests.host.comfy_env_pixart import load_pixart_file

        model = load_pixart_file(tiny_pixart.FIXTURE_PATH)
        channels, decode = tiny_pixart.LATENT_CHANNELS, tiny_pixart.latent_to_rgb

        def cond(prompt):
            return [[tiny_pixart.encode_prompts([prompt]), {}]]
    else:
        model = comfy.sd.load_diffusion_model(args.model)
        channels, decode = 16, tiny_t2i.latent_to_rgb

        def cond(prompt):
            ctx, pooled = tiny_t2i.encode_prompts([prompt])
            return [[ctx, {"pooled_output": pooled}]]
    prompts = list(tiny_t2i.EVAL_PROMPTS[: args.prompts])
    latent_hw = (args.res // 8, args.res // 8)

    def sample(m, prompt, seed):
        latent = torch.zeros(1, channels, *latent_hw)
        noise = comfy.sample.prepare_noise(latent, seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, args.steps, args.cfg, args.sampler, args.scheduler,
                                      cond(prompt), cond(""), latent, disable_pbar=True, seed=seed)
        return decode(out.float().cpu()), time.perf_counter() - start

    cases = list(itertools.product(prompts, args.seeds))
    reference = {}
    ref_time = 0.0
    counted, calls = counting_calls(model)
    for prompt, seed in cases:
        reference[(prompt, seed)], t = sample(counted if not calls_per_run[0] else model, prompt, seed)
        calls_per_run[0] = calls_per_run[0] or len(calls)
        ref_time += t

    settings = [("cat", dict(keep_ratio=k, warmup_steps=w, cooldown_steps=cd, num_clusters=n, stale_share=s, selection=sel, ranking=rk,
                             extrapolation=ex, refresh_first_block=bool(r), cache_space=cs, reuse_threshold=ru, max_reuses_in_row=mr,
                             prune_any_sampler=bool(args.prune_any_sampler)))
                for k, w, cd, n, s, sel, rk, ex, r, cs, ru, mr in itertools.product(
                    args.keep, args.warmup, args.cooldown, args.clusters, args.stale_share, args.selection, args.ranking,
                    args.extrapolation, args.refresh_first_block, args.cache_space, args.reuse, args.max_reuses)]
    settings += [("lazycache", dict(reuse_threshold=r)) for r in args.lazycache]
    columns = [[reference[(p, args.seeds[0])] for p in prompts]]
    for kind, values in settings:
        patched, stats_of = make_patched(pack, model, kind, values)
        psnrs, ssims, total_time, saved = [], [], 0.0, []
        column = []
        for prompt, seed in cases:
            image, t = sample(patched, prompt, seed)
            total_time += t
            psnrs.append(float(metrics.psnr(image, reference[(prompt, seed)])[0]))
            ssims.append(float(metrics.ssim(image, reference[(prompt, seed)])[0]))
            saved.append(stats_of())
            if seed == args.seeds[0]:
                column.append(image)
        columns.append(column)
        print(json.dumps({
            "bench": "quality", "method": kind, **values, "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
            "res": args.res, "images": len(cases), "psnr_mean": round(metrics.finite_mean(psnrs), 2), "psnr_min": round(min(psnrs), 2),
            "ssim_mean": round(sum(ssims) / len(ssims), 4), "macs_saved": round(sum(f for f, _, _ in saved) / len(saved), 4),
            "macs_saved_sd3_medium": round(sum(p for _, p, _ in saved) / len(saved), 4),
            "time_s": round(total_time, 2), "unpatched_time_s": round(ref_time, 2), "time_ratio": round(ref_time / total_time, 3),
            "psnr_per_image": [round(v, 2) for v in psnrs], "modes_of_last_run": saved[-1][2],
        }), flush=True)
    write_grid(columns, args.out)
    print(json.dumps({"bench": "quality", "grid": args.out}))


def make_patched(pack, model, kind, values):
    """The model with the method applied, and a function returning (MACs saved by its last run at
    the fixture's scale, the same run's saving projected to SD3-medium scale, the mode of each of
    its model calls as one letter: d dense, c capture, p pruned, r reused; "" for LazyCache)."""
    if kind == "lazycache":
        from comfy_extras.nodes_easycache import LazyCacheNode

        patched, calls = counting_calls(LazyCacheNode.execute(model, values["reuse_threshold"], 0.15, 0.95, False).args[0])

        def lazycache_saved():
            # A skipped step skips the whole model call (at either scale); LazyCache's own checks are negligible.
            ran, expected = len(calls), calls_per_run[0]
            calls.clear()
            return 1 - ran / expected, 1 - ran / expected, ""
        return patched, lazycache_saved
    accounting = pack.cat_core.accounting
    settings = pack.cat_core.CATSettings(**values)
    patched = pack.nodes.patch.apply_cat(model, settings)

    def cat_saved():
        stats = pack.nodes.patch.holder_of(patched).last_stats
        modes = [c.mode for c in stats.calls]
        return stats.ledger.saved_fraction(), accounting.projected_saving_of_modes(modes, settings), "".join(m[0] for m in modes)
    return patched, cat_saved


#: model calls of one unpatched run (set by main from the reference runs)
calls_per_run = [0]


def counting_calls(model):
    """A clone of `model` that appends to the returned list on every model call."""
    import comfy.patcher_extension as pe

    calls = []
    counted = model.clone()

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)
    counted.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "cat_bench_count", count)
    return counted, calls


def write_grid(columns, path):
    rows = [torch.cat([col[i][0] for col in columns], dim=1) for i in range(len(columns[0]))]
    grid = (torch.cat(rows, dim=0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


if __name__ == "__main__":
    main()
