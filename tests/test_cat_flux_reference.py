"""CAT pruning on the reference Flux through the host-free harness (cat_core.model_call's protocol).

Host-free: keep 1.0 through the capture/pruned machinery is the unpatched model bit for bit; keep
0.3 prunes; a pruned call on exactly the capture call's input reproduces the capture output for
every token at any keep ratio (the caches then hold exact keys/values). Host tier: the same CAT
run on ComfyUI's Flux (loaded from the reference's state dict, patched by nodes/patch.py and
sampled by ComfyUI) gives the harness's result, so these tests exercise what users run.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from cat_core import CATSettings
from tests import cat_harness, reference_flux
from tests.test_reference_flux import comfy_attention, comfy_flux, requires_comfy

LAYOUTS = ("flux", "flux_schnell")
SHAPES = {"square": (16, 16), "wide": (12, 20)}  # patch 2: 8x8 / 6x10 tokens
# (latent images, cfg, CFG batching): one row; cond+uncond in one call; two images in one call
BATCHES = {"one": (1, 1.0, "uncond_first"), "cfg_pair": (1, 3.0, "uncond_first"), "two_images": (2, 1.0, "uncond_first"),
           "split_cfg": (1, 3.0, "split")}
RTOL = 1e-5  # of the output's scale: fp32 rounding of differently shaped matmuls / attention


@pytest.fixture(scope="module")
def models():
    return {layout: cat_harness.tiny_model(layout, seed=i + 40) for i, layout in enumerate(LAYOUTS)}


def _sample(model, *, batch, hw, steps=6, settings=None, sigmas=None, seed=0):
    images, cfg, layout = BATCHES[batch]
    noise = torch.randn(images, 16, *hw, generator=torch.Generator().manual_seed(seed))
    cond, uncond = cat_harness.random_cond(images, 1), cat_harness.random_cond(images, 2)
    return cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=steps, cfg=cfg, layout=layout,
                              settings=settings, sigmas=sigmas)


@pytest.mark.parametrize("layout,batch,shape", list(itertools.product(LAYOUTS, BATCHES, SHAPES)))
def test_keep_one_reproduces_unpatched_exactly(models, layout, batch, shape):
    model = models[layout]
    ref, none = _sample(model, batch=batch, hw=SHAPES[shape])
    assert none is None
    out, stats = _sample(model, batch=batch, hw=SHAPES[shape],
                         settings=CATSettings(keep_ratio=1.0, warmup_steps=2, num_clusters=5))
    assert stats.fallback_reason is None, stats.fallback_reason
    assert {c.mode for c in stats.calls} == {"dense", "capture", "pruned"}  # the pruned code path really ran
    assert torch.equal(out, ref)
    assert stats.ledger.total_computed == stats.ledger.total_dense


@pytest.mark.parametrize("layout,batch", [("flux", "cfg_pair"), ("flux_schnell", "two_images")])
def test_keep_03_prunes_saves_and_stays_finite(models, layout, batch):
    model = models[layout]
    ref, _ = _sample(model, batch=batch, hw=(16, 20), steps=8)
    out, stats = _sample(model, batch=batch, hw=(16, 20), steps=8,
                         settings=CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=5))
    assert stats.fallback_reason is None, stats.fallback_reason
    assert "pruned" in {c.mode for c in stats.calls}
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    pruned = [c for c in stats.calls if c.mode == "pruned"]
    assert all(0 < c.tokens_computed < c.tokens_total for c in pruned)
    assert 0.3 < stats.ledger.saved_fraction() < 0.9


def _record_calls(monkeypatch):
    """What the sampler gets back from each model call (the harness's cat_model_call, wrapped)."""
    calls = []
    real = cat_harness.cat_model_call

    def recording(run, x, *args, **kwargs):
        out = real(run, x, *args, **kwargs)
        calls.append((x.clone(), out.clone()))
        return out

    monkeypatch.setattr(cat_harness, "cat_model_call", recording)
    return calls


@pytest.mark.parametrize("layout,keep,refresh,batch,shape",
                         list(itertools.product(LAYOUTS[:1], [0.3, 0.55], [True, False], ["one", "cfg_pair", "two_images"], SHAPES))
                         + [("flux_schnell", 0.3, True, "two_images", "wide")])
def test_pruned_call_on_the_capture_input_reproduces_the_capture_output(models, monkeypatch, layout, keep, refresh, batch, shape):
    """Two euler steps at one sigma (dt = 0): step 0 captures, step 1 prunes on the same input.

    Exact caches make the pruned arithmetic exact, so any subset-only indexing bug (wrong
    gather/scatter offsets, modulation rows counted over all tokens) shows here.
    """
    hw = SHAPES[shape]
    calls = _record_calls(monkeypatch)
    settings = CATSettings(keep_ratio=keep, warmup_steps=1, cooldown_steps=0, refresh_first_block=refresh)
    _, stats = _sample(models[layout], batch=batch, hw=hw, settings=settings, sigmas=torch.tensor([0.7, 0.7, 0.0]))
    assert stats.fallback_reason is None, stats.fallback_reason
    assert [c.mode for c in stats.calls] == ["capture", "pruned"]
    rows = 2 if batch != "one" else 1
    tokens = (hw[0] // 2) * (hw[1] // 2)
    pruned = stats.calls[-1]
    assert pruned.rows == rows and 0 < pruned.tokens_computed == rows * round(keep * tokens) < pruned.tokens_total

    (x0, capture), (x1, out) = calls
    assert torch.equal(x0, x1), "the pruned call must see the capture call's input"
    fresh = stats.selection_masks[0][0]  # [rows, h, w] tokens recomputed by the pruned call
    assert 0 < fresh.sum() < fresh.numel()
    assert x0.shape[0] == rows
    mask = fresh.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand_as(capture)
    scale = capture.abs().max().item()
    diff = (out - capture).abs()
    recomputed, reused = diff[mask].max().item(), diff[~mask].max().item()
    assert recomputed <= RTOL * scale, f"recomputed tokens differ by {recomputed:.3g} (output scale {scale:.3g})"
    assert reused <= RTOL * scale, f"cached tokens differ by {reused:.3g} (output scale {scale:.3g})"


@requires_comfy
@pytest.mark.parametrize("layout,keep", [("flux", 0.3), ("flux_schnell", 0.3), ("flux", 0.55)])
def test_cat_run_matches_comfyui(comfy, monkeypatch, layout, keep):
    """One state dict, one schedule, one noise: the harness's CAT run on the reference equals
    nodes/patch.py's CAT run on ComfyUI's Flux under ComfyUI's sampler (ComfyUI's attention in both)."""
    from tests.host import comfy_env as ce

    pack = ce.import_pack()
    model = cat_harness.tiny_model(layout, seed=7)
    patcher, _ = comfy_flux(comfy, model)
    sigmas = cat_harness.flow_sigmas(8)
    hw = (16, 20)
    noise = torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(3))
    cond = ce.flux_cond(1, 1, tokens=8, vec_dim=64, guidance=3.5)
    settings = CATSettings(keep_ratio=keep, warmup_steps=2, num_clusters=5)

    patched = pack.nodes.patch.apply_cat(patcher, settings)
    sampler = comfy.samplers.sampler_object("euler")
    latent = torch.zeros(1, 16, *hw)
    with torch.inference_mode():
        theirs = comfy.sample.sample_custom(patched, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                            disable_pbar=True, seed=3)
    their_stats = pack.nodes.patch.holder_of(patched).last_stats

    monkeypatch.setattr(reference_flux, "attention", comfy_attention)
    mm = patcher.model
    out, stats = cat_harness.sample(model, cond=(cond[0][0], cond[0][1]["pooled_output"]), noise=noise, steps=8,
                                    cfg=1.0, settings=settings, sigmas=sigmas, guidance=3.5,
                                    init_latent=mm.process_latent_in(latent))
    ours = mm.process_latent_out(out)

    assert stats.fallback_reason is None and their_stats.fallback_reason is None
    assert [c.mode for c in stats.calls] == [c.mode for c in their_stats.calls]
    assert "pruned" in {c.mode for c in stats.calls}
    assert len(stats.selection_masks) == len(their_stats.selection_masks) > 0
    for a, b in zip(stats.selection_masks, their_stats.selection_masks):
        assert torch.equal(a, b)
    assert stats.ledger.total_computed == their_stats.ledger.total_computed
    assert torch.equal(ours, theirs.float()), (ours - theirs).abs().max().item()
