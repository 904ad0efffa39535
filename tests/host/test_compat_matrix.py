"""Compatibility matrix: CAT Pruning inside ComfyUI's real sampler loop, across every sampler axis.

"Never break a user's graph": for every combination a user can pick in a KSampler (sampler,
scheduler, cfg, batch with different prompts per image, cond/uncond batched or split, txt2img or
img2img at any denoise, square / portrait / landscape / odd latent sizes, 4 to 50 steps) on every
SD3-family layout, a patched model

- runs without error and gives a finite latent;
- at keep_ratio 1.0 gives exactly (torch.equal) the unpatched latent;
- at keep_ratio 0.3 gives a finite latent, and when there are more sampler steps than warm-up
  plus cool-down steps it really pruned (pruned model calls, MACs saved > 0); otherwise it does
  nothing: the latent equals the unpatched one and no MACs are saved.

(a) covers every pair of axis values at least once (a greedy all-pairs selection, computed
    deterministically below), (b) draws a few hundred random configurations (fixed seed) from the
    same axes at small sizes and mostly few steps, and also varies the other CAT settings
    (CAT_COMPAT_RANDOM_N overrides how many), (c) runs every other sampler ComfyUI offers and graph
    shapes beyond a plain KSampler: two-stage KSamplerAdvanced, custom-sampler guiders (Basic, CFG,
    DualCFG), combined / area / mask conds, inpainting masks, Differential Diffusion, 1-token latents.

Stochastic samplers (euler_ancestral, dpmpp_2m_sde, dpmpp_2s_ancestral, lcm) draw their noise from
the seed ComfyUI gives them, so they are deterministic and keep-1.0 exactness applies to them too.
"""
from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "heun", "uni_pc", "lcm")
TWO_EVAL_SAMPLERS = ("heun", "dpmpp_2s_ancestral")
SCHEDULERS = ("simple", "normal", "karras", "sgm_uniform")
CFGS = (1.0, 5.0)
BATCHES = (1, 2, 3, 4)
CFG_MODES = ("batched", "split")
DENOISES = (1.0, 0.3, 0.6, 0.85)  # 1.0 = txt2img from an empty latent; < 1 = img2img
SIZES = {  # latent (h, w) = image / 8; patch 2, so 9x13 is padded by the model to 5x7 tokens
    "square": (12, 12),
    "square32": (32, 32),
    "portrait": (16, 10),
    "landscape": (10, 16),
    "odd": (9, 13),
}
STEPS = (4, 6, 10, 20, 50)
# Warm-up relative to the step count: "below" = more warm-up steps than sampler steps, "equal" =
# the capture happens at the very last step; the others prune after 1, 2 or steps//2 full steps.
WARMUPS = ("below", "equal", "w1", "w2", "half")




@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=21) for layout in ce.SD3_LAYOUTS}


@dataclass(frozen=True)
class Config:
    layout: str
    sampler: str
    scheduler: str
    cfg: float
    batch: int
    cfg_mode: str
    denoise: float
    size: tuple
    steps: int
    warmup: int
    seed: int = 0
    num_clusters: int = 20
    stale_share: float = 0.75
    cluster_iters: int = 10
    feature_scale: float = 0.05
    cat_seed: int = 0
    cooldown: int = 1  # the pack's default

    @property
    def prunes(self) -> bool:
        return self.steps - self.cooldown > self.warmup

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())


def warmup_for(rel: str, steps: int) -> int:
    return {"below": steps + 2, "equal": steps, "w1": 1, "w2": 2, "half": max(1, steps // 2)}[rel]


def cost(cfg: Config) -> int:
    """Rough CPU cost of one sampler run (model rows x tokens x evaluations)."""
    h, w = cfg.size
    tokens = ((h + 1) // 2) * ((w + 1) // 2)
    evals = cfg.steps * (2 if cfg.sampler in TWO_EVAL_SAMPLERS else 1)
    return evals * cfg.batch * (2 if cfg.cfg > 1 else 1) * tokens


# --------------------------------------------------------------------------------------------
# the checks shared by (a) and (b)
# --------------------------------------------------------------------------------------------
def _latent(cfg: Config):
    if cfg.denoise >= 1.0:
        return None
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    return torch.randn(cfg.batch, 16, *cfg.size, generator=gen)


def _sample(model, cfg: Config):
    latent = _latent(cfg)
    return ce.sample(
        model, seed=cfg.seed, steps=cfg.steps, cfg=cfg.cfg, sampler_name=cfg.sampler, scheduler=cfg.scheduler,
        # a different prompt per image, and an uncond that differs from every prompt
        positive=ce.random_sd3_cond(10 + cfg.seed, cfg.batch), negative=ce.random_sd3_cond(500 + cfg.seed, cfg.batch),
        batch=cfg.batch, latent_hw=cfg.size, denoise=cfg.denoise, latent_image=latent,
        force_split_cfg=cfg.cfg_mode == "split",
    )


def _settings(pack, cfg: Config, keep: float):
    return pack.cat_core.CATSettings(
        keep_ratio=keep, warmup_steps=cfg.warmup, num_clusters=cfg.num_clusters, stale_share=cfg.stale_share,
        cluster_iters=cfg.cluster_iters, feature_scale=cfg.feature_scale, seed=cfg.cat_seed,
        cooldown_steps=cfg.cooldown, prune_any_sampler=True,  # the machinery with every sampler
    )


def check_config(pack, models, cfg: Config) -> list[str]:
    """Run unpatched, keep 1.0 and keep 0.3; return the list of violated expectations."""
    problems = []
    model = models[cfg.layout]
    reference = _sample(model, cfg)
    if not torch.isfinite(reference).all():
        return ["the unpatched model itself gives a non-finite latent (test setup problem)"]

    exact = pack.nodes.patch.apply_cat(model, _settings(pack, cfg, 1.0))
    out = _sample(exact, cfg)
    stats = pack.nodes.patch.holder_of(exact).last_stats
    if not torch.equal(out, reference):
        problems.append(f"keep 1.0 is not exact: max |diff| {(out - reference).abs().max().item():.3g}")
    if stats is None or stats.fallback_reason is not None:
        problems.append(f"keep 1.0 run fell back or left no stats: {getattr(stats, 'fallback_reason', None)}")

    pruned = pack.nodes.patch.apply_cat(model, _settings(pack, cfg, 0.3))
    out = _sample(pruned, cfg)
    stats = pack.nodes.patch.holder_of(pruned).last_stats
    n_pruned = sum(c.mode == "pruned" for c in stats.calls)
    saved = stats.ledger.saved_fraction()
    if not torch.isfinite(out).all():
        problems.append("keep 0.3 gives a non-finite latent")
    if out.shape != reference.shape:
        problems.append(f"keep 0.3 latent shape {tuple(out.shape)} != {tuple(reference.shape)}")
    if stats.fallback_reason is not None:
        problems.append(f"keep 0.3 fell back to dense: {stats.fallback_reason}")
    span = f"{cfg.steps} steps, warm-up {cfg.warmup}, cool-down {cfg.cooldown}"
    if cfg.prunes:
        if n_pruned == 0:
            problems.append(f"keep 0.3 with {span}: no pruned call ({[c.mode for c in stats.calls]})")
        if not saved > 0:
            problems.append(f"keep 0.3 with {span}: MACs saved {saved}")
    else:
        if not torch.equal(out, reference):
            problems.append(f"{span} (nothing to prune): the patch changed the result "
                            f"(max |diff| {(out - reference).abs().max().item():.3g})")
        if n_pruned or saved != 0.0:
            problems.append(f"{span} (nothing to prune): {n_pruned} pruned calls, {saved:.3f} MACs saved")
    return problems


# --------------------------------------------------------------------------------------------
# (a) all-pairs selection
# --------------------------------------------------------------------------------------------
PAIR_AXES = {
    "layout": ce.SD3_LAYOUTS,
    "sampler": SAMPLERS,
    "scheduler": SCHEDULERS,
    "cfg": CFGS,
    "batch": BATCHES,
    "cfg_mode": CFG_MODES,
    "denoise": DENOISES,
    "size": tuple(SIZES),
    "steps": STEPS,
    "warmup": WARMUPS,
}
MAX_PAIR_COST = 12_000  # keeps the biggest cells (50 steps, batch 4, 32x32, two-call samplers) apart
# Step count is paired with what interacts with step counting (sampler, scheduler, warm-up, denoise,
# layout); batch / size / cfg only change the tensors' shapes, so each of their values meets the
# step counts through the other axes, not pair by pair (this halves the cost of the 50-step cells).
UNPAIRED = {frozenset(p) for p in (("steps", "batch"), ("steps", "size"), ("steps", "cfg"), ("steps", "cfg_mode"))}


def _row_to_config(row: dict, index: int) -> Config:
    return Config(
        layout=row["layout"], sampler=row["sampler"], scheduler=row["scheduler"], cfg=row["cfg"], batch=row["batch"],
        cfg_mode=row["cfg_mode"], denoise=row["denoise"], size=SIZES[row["size"]], steps=row["steps"],
        warmup=warmup_for(row["warmup"], row["steps"]), seed=index,
    )


def axis_pairs(names) -> list[tuple[str, str]]:
    return [(a, b) for a, b in itertools.combinations(names, 2) if frozenset((a, b)) not in UNPAIRED]


def all_pairs(axes: dict, *, max_cost: int, seed: int = 0, candidates: int = 40) -> list[dict]:
    """Greedy all-pairs covering array: every value pair of every two axes is in some row.

    Each new row is the best of `candidates` seeded random completions of an uncovered pair (most
    new pairs, then lowest cost) among those within `max_cost`. Deterministic for a seed.
    """
    names = list(axes)
    rng = random.Random(seed)
    combos = axis_pairs(names)
    uncovered = {((a, va), (b, vb)) for a, b in combos for va in axes[a] for vb in axes[b]}

    def pairs_of(row):
        return {((a, row[a]), (b, row[b])) for a, b in combos}

    order = sorted(uncovered)
    rows = []
    while uncovered:
        order = [p for p in order if p in uncovered]
        seed_pair = order[0] if not rows else rng.choice(order)
        best, best_key = None, None
        for _ in range(candidates):
            row = {n: rng.choice(axes[n]) for n in names}
            row[seed_pair[0][0]], row[seed_pair[1][0]] = seed_pair[0][1], seed_pair[1][1]
            c = cost(_row_to_config(row, 0))
            if c > max_cost:
                continue
            key = len(pairs_of(row) & uncovered) - c / 1500  # a new pair is worth 1500 cost units
            if best_key is None or key > best_key:
                best, best_key = row, key
        if best is None:  # the pair itself needs the cheapest values of every other axis
            best = {n: min(axes[n], key=lambda v, n=n: cost(_row_to_config({**{m: axes[m][0] for m in names}, n: v}, 0)))
                    for n in names}
            best[seed_pair[0][0]], best[seed_pair[1][0]] = seed_pair[0][1], seed_pair[1][1]
        uncovered -= pairs_of(best)
        rows.append(best)
    return rows


PAIRWISE_ROWS = all_pairs(PAIR_AXES, max_cost=MAX_PAIR_COST)
PAIRWISE = [_row_to_config(row, i) for i, row in enumerate(PAIRWISE_ROWS)]


def test_pairwise_selection_covers_every_pair():
    names = list(PAIR_AXES)
    seen = {((a, r[a]), (b, r[b])) for r in PAIRWISE_ROWS for a, b in axis_pairs(names)}
    missing = [((a, va), (b, vb)) for a, b in axis_pairs(names)
               for va in PAIR_AXES[a] for vb in PAIR_AXES[b] if ((a, va), (b, vb)) not in seen]
    assert not missing, missing[:10]
    # and so every value of every axis at least once
    for name, values in PAIR_AXES.items():
        assert {r[name] for r in PAIRWISE_ROWS} == set(values), name
    assert len(PAIRWISE) < 80  # pairwise, not the full product


def _cell_id(cfg: Config) -> str:
    h, w = cfg.size
    return (f"{cfg.layout}-{cfg.sampler}-{cfg.scheduler}-cfg{cfg.cfg:g}-b{cfg.batch}-{cfg.cfg_mode}-"
            f"d{cfg.denoise:g}-{h}x{w}-s{cfg.steps}-w{cfg.warmup}")


@pytest.mark.parametrize("cfg", PAIRWISE, ids=_cell_id)
def test_pairwise_cell(pack, models, cfg):
    problems = check_config(pack, models, cfg)
    assert not problems, f"config: {cfg.describe()}\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------
# (b) random configurations
# --------------------------------------------------------------------------------------------
RANDOM_N = int(os.environ.get("CAT_COMPAT_RANDOM_N", "220"))
RANDOM_SEED = 20250200433
RANDOM_SIZES = ((8, 8), (12, 8), (8, 12), (7, 9), (11, 5), (6, 6), (4, 4), (9, 13), (16, 10), (16, 16))


def random_configs(n: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # mostly few steps; now and then a longer run
        steps = rng.choice((2, 3, 4, 5, 6)) if rng.random() < 0.9 else rng.choice((10, 16, 24))
        rel = rng.choice(WARMUPS)
        size = rng.choice(RANDOM_SIZES)
        batch = rng.choice((1, 1, 1, 2, 2, 3, 4))
        if size[0] * size[1] > 100 or steps > 6:  # the bigger latents and longer runs: one image
            batch = 1
        out.append(Config(
            layout=rng.choice(ce.SD3_LAYOUTS), sampler=rng.choice(SAMPLERS), scheduler=rng.choice(SCHEDULERS),
            cfg=rng.choice(CFGS + (2.5,)), batch=batch, cfg_mode=rng.choice(CFG_MODES),
            denoise=rng.choice((1.0, 1.0, 0.3, 0.45, 0.6, 0.75, 0.9)), size=size, steps=steps,
            warmup=warmup_for(rel, steps), seed=rng.randrange(10_000),
            num_clusters=rng.choice((1, 2, 4, 20, 256)), stale_share=rng.choice((0.0, 0.25, 0.75, 1.0)),
            cluster_iters=rng.choice((0, 1, 10)), feature_scale=rng.choice((0.0, 0.05, 1.0, 100.0)),
            cat_seed=rng.randrange(2**31),
        ))
    # Cool-down from the drawn CAT seed rather than a new draw, so the other fields keep their sequence.
    return [replace(c, cooldown=(0, 1, 1, 2)[c.cat_seed % 4]) for c in out]


def test_random_configurations(pack, models):
    configs = random_configs(RANDOM_N, RANDOM_SEED)
    started = time.perf_counter()
    failures = []
    for i, cfg in enumerate(configs):
        try:
            problems = check_config(pack, models, cfg)
        except Exception as error:  # noqa: BLE001 - report the config, then keep going
            problems = [f"raised {type(error).__name__}: {error}"]
        if problems:
            failures.append(f"#{i}: {cfg.describe()}\n    " + "\n    ".join(problems))
            print(f"FAILED config #{i}: {cfg.describe()}\n    " + "\n    ".join(problems))
    elapsed = time.perf_counter() - started
    print(f"{len(configs)} random configurations in {elapsed:.1f}s, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(configs)} random configurations failed:\n" + "\n".join(failures[:15])


# --------------------------------------------------------------------------------------------
# (c) every other sampler ComfyUI offers, and graph shapes beyond a plain KSampler
# --------------------------------------------------------------------------------------------
def _exact_and_pruning(pack, model, sample_fn, *, warmup=2, expect_pruned=True):
    reference = sample_fn(model)
    assert torch.isfinite(reference).all()
    exact = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=1.0, warmup_steps=warmup, prune_any_sampler=True))
    out = sample_fn(exact)
    assert torch.equal(out, reference), f"keep 1.0 not exact: max |diff| {(out - reference).abs().max().item():.3g}"
    pruned = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=warmup, prune_any_sampler=True))
    out = sample_fn(pruned)
    stats = pack.nodes.patch.holder_of(pruned).last_stats
    assert torch.isfinite(out).all()
    assert stats.fallback_reason is None
    if expect_pruned:
        assert any(c.mode == "pruned" for c in stats.calls) and stats.ledger.saved_fraction() > 0, [c.mode for c in stats.calls]
    return stats


# dpm_fast reports one callback per DPM-solver step (3 callbacks for 8 evaluations), and warm-up
# counts callbacks: it is exact and safe but only prunes at longer runs.
FEW_CALLBACK_SAMPLERS = ("dpm_fast",)


OTHER_SAMPLERS = (
    "euler_cfg_pp", "euler_ancestral_cfg_pp", "heunpp2", "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_2m_cfg_pp", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc_bh2",
)


@pytest.mark.parametrize("sampler", OTHER_SAMPLERS)
def test_every_other_sampler(pack, models, comfy, sampler):
    assert sampler in comfy.samplers.SAMPLER_NAMES
    cfg = Config(layout="sd35_medium", sampler=sampler, scheduler="simple", cfg=4.0, batch=1, cfg_mode="batched",
                 denoise=1.0, size=(8, 8), steps=6, warmup=2)
    _exact_and_pruning(pack, models[cfg.layout], lambda m: _sample(m, cfg),
                       expect_pruned=sampler not in FEW_CALLBACK_SAMPLERS)


def test_two_stage_advanced_ksampler(pack, models, comfy):
    """KSamplerAdvanced pair (steps 0-4 with leftover noise, then 4-end): each stage is its own run."""
    pos, neg = ce.random_sd3_cond(1), ce.random_sd3_cond(2)

    def stage(model, latent, start, last, add_noise, force_full):
        noise = comfy.sample.prepare_noise(latent, 7) if add_noise else torch.zeros_like(latent)
        with torch.inference_mode():
            out = comfy.sample.sample(model, noise, 10, 4.0, "euler", "simple", pos, neg, latent, start_step=start,
                                      last_step=last, force_full_denoise=force_full, disable_pbar=True, seed=7)
        return out.float().clone()

    def two_stage(model):
        first = stage(model, torch.zeros(1, 16, 12, 12), 0, 5, True, False)
        return stage(model, first, 5, 10_000, False, True)

    stats = _exact_and_pruning(pack, models["sd3"], two_stage)
    assert len(stats.calls) == 5  # the holder describes the second stage (steps 5..9)


@pytest.mark.parametrize("guider", ["basic", "cfg", "dual_regular", "dual_nested"])
def test_custom_sampler_guiders(pack, models, comfy, guider):
    """SamplerCustomAdvanced-style sampling with BasicGuider / CFGGuider / DualCFGGuider (3 conds per call)."""
    import comfy_extras.nodes_custom_sampler as ncs

    def sample_with(model):
        latent = torch.zeros(2, 16, 12, 12)
        noise = comfy.sample.prepare_noise(latent, 4)
        pos, mid, neg = ce.random_sd3_cond(1, 2), ce.random_sd3_cond(3, 2), ce.random_sd3_cond(2, 2)
        if guider == "basic":
            g = ncs.BasicGuider.execute(model, pos).args[0]
        elif guider == "cfg":
            g = ncs.CFGGuider.execute(model, pos, neg, 3.0).args[0]
        else:
            g = ncs.DualCFGGuider.execute(model, pos, mid, neg, 3.0, 2.0, guider.split("_")[1]).args[0]
        sigmas = ncs.BasicScheduler.execute(model, "simple", 6, 1.0).args[0]
        with torch.inference_mode():
            out = g.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=4)
        return out.float().clone()

    _exact_and_pruning(pack, models["sd35_large"], sample_with)


@pytest.mark.parametrize("kind", ["combine", "area", "mask", "area+mask", "cfg1_with_uncond"])
def test_multi_entry_and_regional_conditioning(pack, models, comfy, kind):
    """Several positive entries per step (ConditioningCombine), area and mask conds (model calls on a
    cropped latent: layouts of another size), and cfg 1 with the uncond still computed."""
    import node_helpers

    base = ce.random_sd3_cond(1)
    area = node_helpers.conditioning_set_values(ce.random_sd3_cond(5), {"area": (8, 8, 0, 4), "strength": 1.0,
                                                                         "set_area_to_bounds": False})
    mask = torch.zeros(1, 12 * 8, 12 * 8)
    mask[:, :48] = 1
    masked = node_helpers.conditioning_set_values(ce.random_sd3_cond(6), {"mask": mask, "mask_strength": 1.0,
                                                                           "set_area_to_bounds": False})
    positive = {"combine": base + ce.random_sd3_cond(7), "area": base + area, "mask": base + masked,
                "area+mask": area + masked + base, "cfg1_with_uncond": base}[kind]
    cfg = 1.0 if kind == "cfg1_with_uncond" else 4.0

    def sample_with(model):
        if kind == "cfg1_with_uncond":
            model = model.clone()
            model.model_options["disable_cfg1_optimization"] = True
        return ce.sample(model, seed=3, steps=6, cfg=cfg, sampler_name="euler", scheduler="simple", positive=positive,
                         negative=ce.random_sd3_cond(2), latent_hw=(12, 12))

    _exact_and_pruning(pack, models["sd35_medium"], sample_with)


@pytest.mark.parametrize("latent_hw", [(1, 1), (2, 2), (3, 5), (2, 9), (1, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("keep", [0.01, 0.3])
def test_degenerate_latent_sizes(pack, models, latent_hw, keep):
    """1 to 5 tokens (a 1x1 latent is padded to one 2x2 patch): budgets of a single token, more
    clusters than tokens."""
    model = models["sd3"]
    cfg = Config(layout="sd3", sampler="euler", scheduler="simple", cfg=4.0, batch=2, cfg_mode="batched",
                 denoise=1.0, size=latent_hw, steps=5, warmup=2)
    reference = _sample(model, cfg)
    exact = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=1.0, warmup_steps=2, num_clusters=256))
    assert torch.equal(_sample(exact, cfg), reference)
    pruned = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=2, num_clusters=256))
    out = _sample(pruned, cfg)
    stats = pack.nodes.patch.holder_of(pruned).last_stats
    assert torch.isfinite(out).all() and out.shape == reference.shape
    assert stats.fallback_reason is None
    assert sum(c.mode == "pruned" for c in stats.calls) == 2  # steps 2, 3 (4 is the cool-down step)
    tokens = ((latent_hw[0] + 1) // 2) * ((latent_hw[1] + 1) // 2)
    assert all(c.tokens_computed == 4 * max(1, round(keep * tokens)) for c in stats.calls if c.mode == "pruned")


@pytest.mark.parametrize("kind", ["inpaint_noise_mask", "differential_diffusion", "uncond_longer_prompt"])
def test_img2img_variants(pack, models, comfy, kind):
    """Inpainting with a noise mask (the model output is blended with the source outside the mask),
    Differential Diffusion (a per-step denoise mask function), and an uncond with another prompt
    length than the cond (cond and uncond cannot share a call then)."""
    import comfy_extras.nodes_differential_diffusion as nodes_dd

    mask = None
    if kind != "uncond_longer_prompt":
        mask = torch.zeros(2, 1, 96, 96)
        mask[:, :, 20:70, 10:60] = 1.0
        mask[1] *= 0.5

    def sample_with(model):
        if kind == "differential_diffusion":
            model = nodes_dd.DifferentialDiffusion.execute(model).args[0]
        latent = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(1))
        noise = comfy.sample.prepare_noise(latent, 3)
        negative = ce.random_sd3_cond(2, 2, tokens=30 if kind == "uncond_longer_prompt" else 16)
        with torch.inference_mode():
            out = comfy.sample.sample(model, noise, 6, 4.0, "euler", "simple", ce.random_sd3_cond(1, 2), negative, latent,
                                      denoise=0.8, noise_mask=mask, disable_pbar=True, seed=3)
        return out.float().clone()

    stats = _exact_and_pruning(pack, models["sd35_large"], sample_with)
    assert len(stats.refresh_maps) == (2 if kind == "uncond_longer_prompt" else 1)  # one layout per call kind
