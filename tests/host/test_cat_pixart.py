"""CAT Pruning inside ComfyUI's real sampler loop on PixArt-α / PixArt-Σ (host tier).

Tiny seeded random models in ComfyUI's own PixArtMS (detected as pixart_alpha / pixart_sigma,
comfy.model_base.PixArt, an EPS model). PixArt's blocks are reached by object patches on their
forward; keep 1.0 goes through the whole pruning machinery (selection, gather / scatter, K/V and
output caches), so it must reproduce the unpatched sampler bit for bit.

ComfyUI's PixArt position embedding needs (h + w) / 2 > 32 latent pixels (smaller latents give a
zero-divided embedding), hence the latent sizes here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.host import comfy_env as ce
from tests.host import comfy_env_pixart as cp

pytestmark = pytest.mark.host

STEPS, WARMUP = 5, 2
TXT = 8
SHAPES = {"square": (40, 40), "wide": (36, 52)}  # patch 2: 20x20 / 18x26 tokens


@pytest.fixture(scope="module")
def models(comfy):
    return {kind: cp.tiny_pixart(kind, seed=41 + i) for i, kind in enumerate(cp.PIXART_KINDS)}


def settings(pack, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)
    return pack.cat_core.CATSettings(**kw)


def run(model, *, batch=1, shape="square", cfg=1.0, sampler="euler", steps=STEPS, seed=5, scheduler="normal"):
    pos, neg = cp.pixart_cond(1, batch, tokens=TXT), cp.pixart_cond(2, batch, tokens=TXT)
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                     positive=pos, negative=neg, latent_image=cp.empty_latent(batch, SHAPES[shape]))


def check_exact(pack, model, **kw):
    reference = run(model, **kw)
    assert torch.isfinite(reference).all()
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    out = run(patched, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert {c.mode for c in stats.calls} == {"dense", "capture", "pruned"}, "keep 1.0 must still run pruned calls"
    assert stats.fallback_reason is None and not stats.notes
    assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max().item()}"
    return stats


def test_comfyui_detects_the_tiny_models_as_pixart_eps(comfy, models):
    import comfy.model_sampling
    import comfy.supported_models

    for kind, cls in (("alpha", comfy.supported_models.PixArtAlpha), ("sigma", comfy.supported_models.PixArtSigma)):
        model = models[kind].model
        assert isinstance(model, comfy.model_base.PixArt) and type(model.model_config) is cls
        assert isinstance(model.model_sampling, comfy.model_sampling.EPS)
        assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
        assert model.diffusion_model.micro_conditioning is (kind == "alpha")


@pytest.mark.parametrize("kind,batch,cfg,shape", list(itertools.product(cp.PIXART_KINDS, [1, 2], [1.0, 4.5], SHAPES)))
def test_keep_ratio_one_is_exact(pack, models, kind, batch, cfg, shape):
    check_exact(pack, models[kind], batch=batch, cfg=cfg, shape=shape)


@pytest.mark.parametrize("case", ["heun", "split_cfg", "qk_norm", "no_refresh_first_block"])
def test_other_paths_keep_ratio_one_is_exact(pack, models, case):
    if case == "heun":
        check_exact(pack, models["sigma"], sampler="heun", cfg=4.5, shape="wide")
    elif case == "split_cfg":  # cond and uncond in separate model calls: two layouts
        check_exact(pack, ce.split_cfg(models["alpha"]), batch=2, cfg=4.5)
    elif case == "qk_norm":
        check_exact(pack, cp.tiny_pixart("sigma", seed=47, qk_norm=True), cfg=4.5, shape="wide")
    else:
        model = models["sigma"]
        reference = run(model, cfg=4.5)
        patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0, refresh_first_block=False))
        assert torch.equal(run(patched, cfg=4.5), reference)


def test_real_width_model_through_the_unet_loader_path(pack, comfy):
    """At the widths ComfyUI's detection assumes (1152, 16 heads, 4096 caption channels) the plain
    load_diffusion_model_state_dict path builds the model; one block keeps the test small."""
    sd = cp.tiny_pixart_state_dict("sigma", seed=48, hidden=1152, heads=16, depth=1, caption=4096, tokens=8)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    assert isinstance(model.model, comfy.model_base.PixArt) and model.model.diffusion_model.hidden_size == 1152

    def cond(seed):
        return [[torch.randn(1, 4, 4096, generator=torch.Generator().manual_seed(seed)), {}]]

    def go(m):
        return ce.sample(m, seed=3, steps=4, cfg=3.0, sampler_name="euler", scheduler="normal", positive=cond(1),
                         negative=cond(2), latent_image=cp.empty_latent(1, (34, 34)))

    reference = go(model)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    assert torch.equal(go(patched), reference)
    assert "pruned" in {c.mode for c in pack.nodes.patch.holder_of(patched).last_stats.calls}


def test_patch_leaves_the_model_and_other_clones_alone(pack, models):
    """The object patches live on the patched clone only; with no active call a block is its own forward."""
    model = models["sigma"]
    reference = run(model, cfg=4.5)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    pruned = run(patched, cfg=4.5)
    assert not torch.equal(pruned, reference)
    assert torch.equal(run(model, cfg=4.5), reference), "the unpatched model changed after a patched run"
    # the replacement itself, called outside a CAT model call (or in a dense one), is the block's own forward
    names = sorted(patched.object_patches)
    assert names == [f"diffusion_model.blocks.{i}.forward" for i in range(2)]
    block = model.model.diffusion_model.blocks[1]
    forward = patched.object_patches[names[1]]
    gen = torch.Generator().manual_seed(0)
    d = block.hidden_size
    x, y, t = (torch.randn(s, generator=gen) for s in ((2, 30, d), (1, 2 * TXT, d), (2, 6 * d)))
    with torch.inference_mode():
        expected = type(block).forward(block, x, y, t, None, (10, 12))
        assert torch.equal(forward(x, y, t, None, (10, 12)), expected)
        dense = pack.cat_core.runtime.CallContext(pack.cat_core.schedule.CallMode.DENSE, None, None)
        token = pack.cat_core.model_call.ACTIVE_CALL.set(dense)
        try:
            assert torch.equal(forward(x, y, t, None, (10, 12)), expected)
        finally:
            pack.cat_core.model_call.ACTIVE_CALL.reset(token)
    assert dense.ledger.total_computed == dense.ledger.total_dense > 0
