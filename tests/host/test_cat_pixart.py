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
    # the lean path: every layer of every block ran as a plain function
    assert stats.block_math["lean_blocks"] == stats.block_math["blocks"] > 0 and not stats.block_math["module_layers"]
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
    # a dense call reads its token counts (the runtime charges its MACs from them)
    assert dense.tokens == pack.cat_core.accounting.CallTokens(txt=TXT, img=30)


# ------------------------------------------------------------------ any keep: exact caches, exact result
class Outputs:
    """Outermost APPLY_MODEL wrapper: the input and the (merged) output of every model call."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, t, *args, **kwargs):
        out = executor(x, t, *args, **kwargs)
        self.calls.append((x.detach().clone(), t.detach().clone(), out.detach().float().clone()))
        return out


def sample_at(pack, comfy, model, sigmas, *, batch=1, cfg=1.0, shape="square", sampler="euler", **kw):
    """ComfyUI's sampler (euler) over the given sigmas through the patched model: (calls, stats)."""
    recorder = Outputs()
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "cat_tests_outputs", recorder)
    patched = pack.nodes.patch.apply_cat(recorded, pack.cat_core.CATSettings(warmup_steps=1, cooldown_steps=0, **kw))
    pos, neg = cp.pixart_cond(1, batch, tokens=TXT), cp.pixart_cond(2, batch, tokens=TXT)
    latent = cp.empty_latent(batch, SHAPES[shape])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        comfy.sample.sample_custom(patched, noise, cfg, comfy.samplers.sampler_object(sampler), torch.tensor(sigmas), pos, neg, latent,
                                   disable_pbar=True, seed=5)
    return recorder.calls, pack.nodes.patch.holder_of(patched).last_stats


def fresh_mask(stats, like):
    fresh = stats.selection_masks[0][-1]  # [rows, h, w] tokens recomputed by the last pruned call
    return fresh.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand_as(like)


ANY_KEEP = list(itertools.product(cp.PIXART_KINDS, [0.3, 0.55], [True, False], [(1, 1.0), (1, 4.5), (2, 1.0)], SHAPES))


@pytest.mark.parametrize("kind,keep,refresh,rows_cfg,shape", ANY_KEEP)
def test_pruned_call_on_the_capture_input_reproduces_the_capture_output(pack, comfy, models, kind, keep, refresh, rows_cfg, shape):
    """Two euler steps at one sigma (dt = 0): the pruned call sees the capture call's input, its caches are
    exact, so recomputed tokens must come out as captured (up to fp32 rounding) and reused ones exactly."""
    batch, cfg = rows_cfg
    calls, stats = sample_at(pack, comfy, models[kind], [0.7, 0.7, 0.0], batch=batch, cfg=cfg, shape=shape,
                             keep_ratio=keep, refresh_first_block=refresh)
    assert stats.fallback_reason is None, stats.fallback_reason
    assert [c.mode for c in stats.calls] == ["capture", "pruned"]
    h, w = SHAPES[shape]
    tokens, rows = (h // 2) * (w // 2), batch * (2 if cfg > 1 else 1)
    assert stats.calls[-1].tokens_computed == rows * round(keep * tokens) < stats.calls[-1].tokens_total
    (x0, _, capture), (x1, _, out) = calls
    assert torch.equal(x0, x1)
    mask = fresh_mask(stats, capture)
    assert 0 < mask.sum() < mask.numel()
    scale = capture.abs().max().item()
    diff = (out - capture).abs()
    assert diff[mask].max().item() <= 1e-5 * scale, f"recomputed tokens differ by {diff[mask].max().item():.3g}"
    assert diff[~mask].max().item() <= 1e-5 * scale


def test_reused_tokens_keep_their_noise_prediction(pack, comfy, models):
    """ComfyUI's PixArt is EPS: denoised = x - sigma * eps. A reused token's output at the next call
    must be x - sigma * eps_cached (the cached noise prediction), not a reused x0. With euler the two
    coincide (x_next = x0_pred + sigma_next * eps); heun's step after its correction tells them apart.
    Extrapolation off: this is about what the cache holds, not what a stale token is moved on by."""
    import comfy.model_sampling

    model = models["sigma"]
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.EPS)
    calls, stats = sample_at(pack, comfy, model, [3.0, 1.5, 0.0], sampler="heun", keep_ratio=0.3, extrapolation=0.0)
    assert [c.mode for c in stats.calls] == ["capture", "pruned", "pruned"]
    (_, _, _), (x0, s0, d0), (x1, s1, d1) = calls  # heun's correction at 1.5, then its last (euler) step
    eps0 = (x0 - d0) / s0.view(-1, 1, 1, 1)
    expected = x1 - s1.view(-1, 1, 1, 1) * eps0
    mask = fresh_mask(stats, d1)
    assert torch.allclose(d1[~mask], expected[~mask], rtol=0, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(d1[~mask], d0[~mask], atol=1e-3), "reused tokens must not keep the old x0"


# ------------------------------------------------------------------ MACs, refusals, state
@pytest.mark.parametrize("kind,cfg,refresh", [("alpha", 4.5, True), ("sigma", 1.0, False), ("sigma", 4.5, True)])
def test_mac_ledger_matches_flop_counter(pack, comfy, models, kind, cfg, refresh):
    def counted(m):
        counter = ce.FlopsPerCall()
        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "cat_tests_flops", counter)
        return m, counter

    plain, dense = counted(models[kind])
    run(plain, batch=2, shape="wide", cfg=cfg)
    patched, counter = counted(pack.nodes.patch.apply_cat(models[kind], settings(pack, keep_ratio=0.3, refresh_first_block=refresh)))
    run(patched, batch=2, shape="wide", cfg=cfg)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert "pruned" in {c.mode for c in stats.calls}
    assert stats.ledger.total_dense == sum(dense.macs)
    assert stats.ledger.total_computed == sum(counter.macs)
    assert sum(counter.macs) < 0.8 * sum(dense.macs)


def test_kv_compression_is_refused_with_the_reason(pack, comfy):
    kv = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]}
    model = cp.tiny_pixart("sigma", seed=49, kv_compress=kv)
    assert model.model.diffusion_model.blocks[1].attn.sr_ratio == 2
    with pytest.raises(ValueError, match=r"compresses self-attention keys/values \(sr_ratio 2 in blocks \[1\]\)"):
        pack.nodes.patch.apply_cat(model, settings(pack))
    assert not model.object_patches


def test_other_prediction_types_are_refused(pack, comfy, models):
    import comfy.model_sampling

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model = models["sigma"].clone()
    model.add_object_patch("model_sampling", Flow(models["sigma"].model.model_config))
    with pytest.raises(pack.nodes.patch.UnsupportedModelError, match="noise-prediction"):
        pack.nodes.patch.apply_cat(model, settings(pack))


def test_state_is_reset_between_runs(pack, models):
    """A second run (other size, batch and cfg) and then the first again give the same images as alone."""
    model = models["alpha"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    first = run(patched, cfg=4.5)
    other = run(patched, batch=2, shape="wide")
    assert torch.equal(run(patched, cfg=4.5), first)
    fresh = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    assert torch.equal(run(fresh, batch=2, shape="wide"), other)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None and stats.peak_cache_bytes > 0


def test_error_in_a_pruned_step_falls_back_to_the_unpatched_result(pack, models, monkeypatch):
    model = models["sigma"]
    reference = run(model, cfg=4.5)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pack.cat_core.blocks.pixart, "pruned_block", broken)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, cfg=4.5), reference)
    assert "simulated failure" in pack.nodes.patch.holder_of(patched).last_stats.fallback_reason


def test_dense_calls_skip_the_block_math(pack, models, monkeypatch):
    """Warm-up calls after the first run each block's own forward (no CAT math), and count right."""
    calls = []
    original = pack.cat_core.blocks.pixart.pruned_block

    def counting(*args, **kwargs):
        calls.append(args[6].mode.value)
        return original(*args, **kwargs)

    monkeypatch.setattr(pack.cat_core.blocks.pixart, "pruned_block", counting)
    patched = pack.nodes.patch.apply_cat(models["sigma"], settings(pack, keep_ratio=0.3, warmup_steps=3))
    run(patched, cfg=4.5)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert [c.mode for c in stats.calls] == ["dense"] * 2 + ["capture"] + ["pruned"] * 2
    assert calls == ["capture"] * 2 + ["pruned"] * 4  # two blocks
