"""CAT Pruning inside ComfyUI's real sampler loop on SD3-family models (host tier).

Exactness at keep 1.0 goes through the whole pruning machinery (selection, gather/scatter,
K/V and output caches): it only holds if every part of it is right.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

STEPS, WARMUP = 6, 2



@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=11) for layout in ce.SD3_LAYOUTS}


def settings(pack, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)  # these short runs test the pruned steps: prune to the last step
    return pack.cat_core.CATSettings(**kw)


def run(model, *, batch=1, latent_hw=(32, 32), cfg=5.0, sampler="euler", denoise=1.0, seed=5, steps=STEPS, split=False):
    latent = None
    if denoise < 1.0:
        latent = torch.randn(batch, 16, *latent_hw, generator=torch.Generator().manual_seed(99))
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                     positive=ce.random_sd3_cond(1, batch), negative=ce.random_sd3_cond(2, batch),
                     batch=batch, latent_hw=latent_hw, denoise=denoise, latent_image=latent, force_split_cfg=split)


# Every layout x sampler x cfg, each in two shape/batch/denoise variants.
VARIANTS = [dict(batch=1, latent_hw=(32, 32), denoise=1.0), dict(batch=2, latent_hw=(24, 40), denoise=0.6)]
MATRIX = list(itertools.product(ce.SD3_LAYOUTS, ["euler", "dpmpp_2m", "heun"], [1.0, 5.0], range(len(VARIANTS))))


@pytest.mark.parametrize("layout,sampler,cfg,variant", MATRIX)
def test_keep_ratio_one_is_exact(pack, models, layout, sampler, cfg, variant):
    model = models[layout]
    reference = run(model, cfg=cfg, sampler=sampler, **VARIANTS[variant])
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    out = run(patched, cfg=cfg, sampler=sampler, **VARIANTS[variant])
    stats = pack.nodes.patch.holder_of(patched).last_stats
    modes = {c.mode for c in stats.calls}
    assert modes == {"dense", "capture", "pruned"}, "keep 1.0 must still run pruned calls through the machinery"
    assert stats.fallback_reason is None
    assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max().item()}"


@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
def test_split_cond_uncond_is_exact_and_prunes(pack, models, layout):
    model = models[layout]
    reference = run(model, batch=2, split=True)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    assert torch.equal(run(patched, batch=2, split=True), reference)
    pruned = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    out = run(pruned, batch=2, split=True)
    stats = pack.nodes.patch.holder_of(pruned).last_stats
    assert torch.isfinite(out).all()
    # cond and uncond run as separate calls, each with its own caches and selection
    assert sum(c.mode == "pruned" for c in stats.calls) == 2 * (STEPS - WARMUP)


def test_pruning_saves_macs_as_hand_counted(pack, models):
    """SD3 layout, 32x32 latent (256 tokens), cfg 5 (2 rows), 16 text tokens, D = 128."""
    model = models["sd3"]
    steps, warmup, keep = 10, 3, 0.3
    patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=warmup))
    out = run(patched, steps=steps)
    assert torch.isfinite(out).all()
    stats = pack.nodes.patch.holder_of(patched).last_stats

    d, lt, n, rows, k = 128, 16, 256, 2, round(keep * 256)

    def block(q, last, kv=None):  # one joint block, q image queries, kv image tokens projected to keys/values
        txt = d * d * (2 if last else 6) + lt * 3 * d * d + (0 if last else lt * (d * d + 8 * d * d))
        img = 6 * d * d + (kv or q) * 3 * d * d + q * (d * d + 8 * d * d)
        return txt + img + 2 * (lt + q) * (lt + n) * d

    outer = n * 16 * 4 * d + (256 * d + d * d) + (64 * d + d * d) + lt * 64 * d + 2 * d * d + n * d * 64
    dense = rows * (block(n, False) + block(n, True) + outer)
    # refresh_first_block (default): the first block projects all n tokens, then carries the k selected.
    pruned = rows * (block(k, False, kv=n) + block(k, True) + outer)
    cooldown = pack.cat_core.CATSettings().cooldown_steps  # default settings: the last step runs in full
    pruned_steps = steps - warmup - cooldown
    expected_saved = 1 - ((steps - pruned_steps) * dense + pruned_steps * pruned) / (steps * dense)
    assert stats.ledger.saved_fraction() == pytest.approx(expected_saved, rel=0.02)
    assert [c.tokens_computed for c in stats.calls] == [rows * n] * warmup + [rows * k] * pruned_steps + [rows * n] * cooldown


def test_reusing_patched_model_matches_fresh_runs(pack, models):
    model = models["sd35_medium"]
    s = settings(pack, keep_ratio=0.3)
    shapes = [dict(batch=1, latent_hw=(32, 32)), dict(batch=2, latent_hw=(24, 40)), dict(batch=1, latent_hw=(32, 32), steps=9)]
    shared = pack.nodes.patch.apply_cat(model, s)
    reused = [run(shared, **kw) for kw in shapes]
    fresh = [run(pack.nodes.patch.apply_cat(model, s), **kw) for kw in shapes]
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


def test_fewer_steps_than_warmup_does_nothing(pack, models):
    model = models["sd3"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3, warmup_steps=8))
    assert torch.equal(run(patched, steps=4), run(model, steps=4))
    assert pack.nodes.patch.holder_of(patched).last_stats.ledger.saved_fraction() == 0.0


def test_error_in_pruned_step_falls_back_to_exact_unpatched(pack, models, monkeypatch, caplog):
    model = models["sd35_large"]
    reference = run(model)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pack.cat_core.blocks.mmdit, "pruned_joint_block", broken)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    with caplog.at_level("WARNING"):
        out = run(patched)
    assert torch.equal(out, reference)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert "simulated failure" in stats.fallback_reason
    assert sum("finishing this run without pruning" in r.message for r in caplog.records) == 1


def test_input_model_is_not_modified(pack, models):
    model = models["sd3"]
    before = repr(model.model_options)
    pack.nodes.patch.apply_cat(model, settings(pack))
    assert repr(model.model_options) == before
    assert torch.equal(run(model), run(models["sd3"]))


def test_clear_errors_for_bad_models(pack, models):
    patch = pack.nodes.patch
    once = patch.apply_cat(models["sd3"], settings(pack))
    with pytest.raises(ValueError, match="already has CAT Pruning"):
        patch.apply_cat(once, settings(pack))
    other = models["sd3"].clone()
    other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(patch.UnsupportedModelError, match="supported: SD3"):
        patch.apply_cat(other, settings(pack))


def test_nodes_validate_and_report(pack, models):
    ext = pack.nodes.extension
    with pytest.raises(ValueError, match="keep_ratio"):
        ext.CATPruningSettings.execute(keep_ratio=1.5, warmup_steps=8, num_clusters=20, stale_share=0.75,
                                       cluster_iters=10, feature_scale=0.05, seed=0)
    s = ext.CATPruningSettings.execute(keep_ratio=0.3, warmup_steps=2, num_clusters=8, stale_share=0.5,
                                       cluster_iters=5, feature_scale=0.05, seed=0).args[0]
    patched = ext.CATModelPatch.execute(models["sd3"], s).args[0]
    default = ext.CATModelPatch.execute(models["sd3"]).args[0]
    assert pack.nodes.patch.holder_of(default).settings == pack.cat_core.CATSettings()
    samples = {"samples": run(patched, latent_hw=(24, 40))}
    out = ext.CATStats.execute(patched, samples)
    report, heatmap = out.args[:2]
    assert "MACs saved" in report and "step   5" in report
    assert heatmap.shape == (2, 24 * 8, 40 * 8, 3)  # one map per model row (cond + uncond)
    assert float(heatmap.min()) >= 0 and float(heatmap.max()) <= 1
    with pytest.raises(ValueError, match="no CAT Model Patch"):
        ext.CATStats.execute(models["sd3"], samples)
