"""Randomised whole runs through the host-free harness: ~150 fixed-seed configurations.

Every configuration must run without error, give a finite output and consistent stats; where the
budget covers every token (keep 1.0, or a keep ratio that rounds up to all tokens) the result must
equal the unpatched sample bit for bit. A failure prints the seed and the configuration.
"""
from __future__ import annotations

import random
import time

import torch

from cat_core import CATSettings
from cat_core.tokens import token_grid
from tests import cat_harness

SEED = 20250201
N_CONFIGS = 150
ARCHS = ["sd3", "sd35_large", "sd35_medium"]


def _hw(rng):
    # Latent sides 8..40, odd sizes included; small latents are drawn more often to bound the runtime.
    hi = 40 if rng.random() < 0.25 else 16
    return rng.randint(8, hi), rng.randint(8, hi)


def _work(cfg: dict) -> int:
    """Rough cost: model evaluations x rows x tokens (x2 when an unpatched reference is needed)."""
    hp, wp = token_grid(*cfg["hw"], 2)
    n = hp * wp
    rows = cfg["batch"] * (2 if cfg["cfg"] != 1.0 else 1)
    evals = cfg["steps"] * (2 if cfg["sampler"] == "heun" else 1)
    exact = CATSettings(keep_ratio=cfg["keep"]).token_budget(n) == n
    return evals * rows * (n + 8) * (2 if exact else 1)


MAX_WORK = 4000  # redraw batch/size of the rare heaviest combinations (big latent x batch 3 x 12 Heun steps)


def draw_config(rng: random.Random) -> dict:
    cfg = _draw(rng)
    while _work(cfg) > MAX_WORK:
        cfg["batch"], cfg["hw"] = rng.randint(1, 3), _hw(rng)
    return cfg


def _draw(rng: random.Random) -> dict:
    keep = 1.0 if rng.random() < 0.25 else round(rng.uniform(0.01, 1.0), 3)
    u = rng.random()
    stale = 0.0 if u < 0.1 else 1.0 if u < 0.2 else round(rng.uniform(0.0, 1.0), 3)
    cfg = dict(
        arch=rng.choice(ARCHS),
        batch=rng.randint(1, 3),
        hw=_hw(rng),
        steps=rng.randint(1, 12),
        warmup=rng.randint(1, 10),
        keep=max(0.01, keep),
        clusters=rng.randint(1, 40),
        stale_share=stale,
        cluster_iters=rng.choice([0, 1, 3, 10]),
        feature_scale=rng.choice([0.0, 0.05, 0.05, 1.0]),
        cfg=1.0 if rng.random() < 0.3 else round(rng.uniform(1.5, 8.0), 2),
        layout=rng.choice(["uncond_first", "cond_first", "split"]),
        sampler=rng.choice(["euler", "heun"]),
        denoise=1.0 if rng.random() < 0.3 else round(rng.uniform(0.3, 1.0), 3),
        seed=rng.randint(0, 2**31),
    )
    # From the drawn seed rather than a new draw, so the other fields keep their sequence.
    cfg["cooldown"] = (0, 0, 1, 2)[cfg["seed"] % 4]
    return cfg


_MODELS = {}


def _model(arch):
    if arch not in _MODELS:
        _MODELS[arch] = cat_harness.tiny_model(arch, depth=2)
    return _MODELS[arch]


def run_config(cfg: dict) -> None:
    settings = CATSettings(keep_ratio=cfg["keep"], warmup_steps=cfg["warmup"], cooldown_steps=cfg["cooldown"], num_clusters=cfg["clusters"],
                           stale_share=cfg["stale_share"], cluster_iters=cfg["cluster_iters"],
                           feature_scale=cfg["feature_scale"], seed=cfg["seed"] % 1000)
    b, (h, w) = cfg["batch"], cfg["hw"]
    cond = cat_harness.random_cond(b, cfg["seed"] + 1, tokens=8)
    unc = cat_harness.random_cond(b, cfg["seed"] + 2, tokens=8)
    g = torch.Generator().manual_seed(cfg["seed"])
    noise = torch.randn(b, 16, h, w, generator=g)
    init = torch.randn(b, 16, h, w, generator=g) if cfg["denoise"] < 1.0 else None
    kwargs = dict(cond=cond, uncond=unc, noise=noise, steps=cfg["steps"], cfg=cfg["cfg"], sampler=cfg["sampler"],
                  layout=cfg["layout"], denoise=cfg["denoise"], init_latent=init)
    model = _model(cfg["arch"])

    out, stats = cat_harness.sample(model, settings=settings, **kwargs)
    assert out.shape == noise.shape
    assert torch.isfinite(out).all(), "non-finite output"

    hp, wp = token_grid(h, w, 2)
    n = hp * wp
    budget = settings.token_budget(n)
    use_cfg = cfg["cfg"] != 1.0
    rows_per_call = b if (not use_cfg or cfg["layout"] == "split") else 2 * b
    calls_per_eval = 2 if (use_cfg and cfg["layout"] == "split") else 1
    evals = cfg["steps"] * (2 if cfg["sampler"] == "heun" else 1) - (1 if cfg["sampler"] == "heun" else 0)
    assert len(stats.calls) == evals * calls_per_eval
    capture = cfg["warmup"] - 1
    cooldown_from = cfg["steps"] - cfg["cooldown"]
    if cooldown_from <= cfg["warmup"]:  # no step left to prune: no capture either
        cooldown_from = capture
    for c in stats.calls:
        assert c.rows == rows_per_call and c.tokens_total == rows_per_call * n
        if c.step < capture or c.step >= cooldown_from:
            assert c.mode == "dense"
        elif c.step == capture:
            assert c.mode == "capture"
        else:
            assert c.mode in ("capture", "pruned")
        assert c.tokens_computed == rows_per_call * (budget if c.mode == "pruned" else n)
    ledger = stats.ledger
    assert 0 <= ledger.total_computed <= ledger.total_dense
    saved = ledger.saved_fraction()
    assert 0.0 <= saved < 1.0
    if not any(c.mode == "pruned" for c in stats.calls) or budget == n:
        assert ledger.total_computed == ledger.total_dense
    else:
        assert ledger.total_computed < ledger.total_dense
    for masks in stats.selection_masks:
        assert torch.all(masks.sum(dim=(2, 3)) == budget)
    assert stats.fallback_reason is None
    assert len(stats.refresh_maps) == calls_per_eval  # one layout per CFG chunk when split
    assert all(m.shape == (rows_per_call, hp, wp) for m in stats.refresh_maps)

    if budget == n:
        ref, _ = cat_harness.sample(model, **kwargs)
        assert torch.equal(out, ref), "budget covers every token but the result differs from the unpatched run"


def test_fuzz_random_configurations():
    rng = random.Random(SEED)
    configs = [draw_config(rng) for _ in range(N_CONFIGS)]
    exact = 0
    started = time.perf_counter()
    for i, cfg in enumerate(configs):
        try:
            run_config(cfg)
        except Exception as error:  # noqa: BLE001 - re-raised with the configuration
            raise AssertionError(f"fuzz seed {SEED}, config #{i}: {cfg!r}: {type(error).__name__}: {error}") from error
        hp, wp = token_grid(*cfg["hw"], 2)
        exact += CATSettings(keep_ratio=cfg["keep"]).token_budget(hp * wp) == hp * wp
    print(f"fuzz: {N_CONFIGS} configs ({exact} checked for exactness) in {time.perf_counter() - started:.1f}s")
    # The draws really cover the ranges (guards against a change of the generator narrowing them).
    assert exact >= 20
    sides = [s for c in configs for s in c["hw"]]
    assert min(sides) == 8 and max(sides) >= 36 and any(s % 2 for s in sides)
    assert sum(min(c["hw"]) >= 20 for c in configs) >= 5
    for key, values in (("arch", ARCHS), ("batch", [1, 2, 3]), ("layout", ["uncond_first", "cond_first", "split"]),
                        ("sampler", ["euler", "heun"]), ("steps", range(1, 13)), ("warmup", range(1, 11)),
                        ("cooldown", [0, 1, 2])):
        assert {c[key] for c in configs} == set(values), key
    assert any(c["cfg"] == 1.0 for c in configs) and any(c["cfg"] > 1.0 for c in configs)
    assert min(c["keep"] for c in configs) < 0.05 and min(c["denoise"] for c in configs) < 0.4
    assert {c["stale_share"] for c in configs} >= {0.0, 1.0}
    assert min(c["clusters"] for c in configs) <= 2 and max(c["clusters"] for c in configs) >= 38
