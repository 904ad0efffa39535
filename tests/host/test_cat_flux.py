"""CAT Pruning inside ComfyUI's real sampler loop on Flux-family models and Chroma (host tier).

Tiny seeded random models in ComfyUI's own classes (2 double + 2 single blocks, hidden 256 =
2 heads x 128). Exactness at keep 1.0 goes through the whole pruning machinery (selection,
gather/scatter of tokens and RoPE rows, K/V and output caches, reference tokens).
"""
from __future__ import annotations

import dataclasses

import itertools

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

STEPS, WARMUP = 5, 2
TXT = 8  # text tokens of the random conds (Flux.2 pads them to 512)
REF_HW = (10, 14)  # Kontext reference latent: 5 x 7 = 35 tokens, a different size from the image


@pytest.fixture(scope="module")
def models(comfy):
    return {
        "flux": ce.tiny_flux("flux", seed=21),
        "chroma": ce.tiny_flux("chroma", seed=22),
        "schnell": ce.tiny_flux("flux", seed=23, guidance_embed=False),
        "flux2": ce.tiny_flux("flux2", seed=24),
    }


def settings(pack, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)  # these short runs test the pruned steps: prune to the last step
    return pack.cat_core.CATSettings(**kw)


def channels(kind):
    return 128 if kind == "flux2" else 16


def reference_latent(kind, hw=REF_HW):
    return torch.randn(1, channels(kind), *hw, generator=torch.Generator().manual_seed(77))


def conds(kind, batch, *, kontext=False, method=None, mask_hw=None):
    vec = 64 if kind in ("flux", "schnell") else None
    guidance = 0.0 if kind == "chroma" else 3.5
    refs = [reference_latent(kind)] if kontext else None
    out = []
    for seed in (1, 2):
        c = ce.flux_cond(seed, batch, tokens=TXT, vec_dim=vec, guidance=guidance, reference_latents=refs,
                         reference_latents_method=method)
        if mask_hw is not None:  # a [B, L, L] additive attention bias over text + image tokens
            n = TXT + mask_hw[0] * mask_hw[1]
            bias = torch.randn(1, n, n, generator=torch.Generator().manual_seed(seed + 10)) * 0.5
            c[0][1]["attention_mask"] = bias
            c[0][1]["attention_mask_img_shape"] = mask_hw
        out.append(c)
    return out


def run(model, kind, *, batch=1, latent_hw=(16, 16), cfg=1.0, sampler="euler", steps=STEPS, seed=5, **cond_kw):
    pos, neg = conds(kind, batch, **cond_kw)
    latent = torch.zeros(batch, channels(kind), *latent_hw)
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                     positive=pos, negative=neg, latent_image=latent)


def check_exact(pack, model, kind, **kw):
    reference = run(model, kind, **kw)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    out = run(patched, kind, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert {c.mode for c in stats.calls} == {"dense", "capture", "pruned"}, "keep 1.0 must still run pruned calls"
    assert stats.fallback_reason is None
    assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max().item()}"
    return stats


VARIANTS = [dict(batch=1, latent_hw=(16, 16)), dict(batch=2, latent_hw=(12, 20))]


@pytest.mark.parametrize("kontext,sampler,variant", list(itertools.product([False, True], ["euler", "heun"], range(2))))
def test_flux_keep_ratio_one_is_exact(pack, models, kontext, sampler, variant):
    check_exact(pack, models["flux"], "flux", sampler=sampler, kontext=kontext, **VARIANTS[variant])


@pytest.mark.parametrize("sampler,cfg,variant", list(itertools.product(["euler", "heun"], [1.0, 4.0], range(2))))
def test_chroma_keep_ratio_one_is_exact(pack, models, sampler, cfg, variant):
    check_exact(pack, models["chroma"], "chroma", sampler=sampler, cfg=cfg, **VARIANTS[variant])


@pytest.mark.parametrize("case", ["flux_cfg", "schnell", "flux_mask", "flux2_kontext", "flux2_timestep_zero"])
def test_other_flux_variants_keep_ratio_one_is_exact(pack, models, case):
    if case == "flux_cfg":  # Flux with real CFG (cond + uncond rows) and a Kontext reference
        check_exact(pack, models["flux"], "flux", cfg=3.5, kontext=True, **VARIANTS[1])
    elif case == "schnell":  # no guidance embedder: FluxSchnell, discrete-flow sampling
        assert type(models["schnell"].model.model_sampling).__mro__[1].__name__ == "ModelSamplingDiscreteFlow"
        check_exact(pack, models["schnell"], "schnell", **VARIANTS[1])
    elif case == "flux_mask":  # an attention mask: its query rows are pruned with the tokens
        check_exact(pack, models["flux"], "flux", latent_hw=(12, 20), mask_hw=(6, 10))
    elif case == "flux2_kontext":  # Flux.2: global modulation, patch 1, text padded to 512
        check_exact(pack, models["flux2"], "flux2", latent_hw=(6, 8), kontext=True)
    else:  # reference tokens modulated at t = 0 (per-token modulation ranges)
        check_exact(pack, models["flux2"], "flux2", latent_hw=(6, 8), kontext=True, method="index_timestep_zero")


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "pytorch"), (torch.float16, "sub_quad"), (torch.float32, "split")])
def test_keep_ratio_one_is_exact_in_half_precision_and_other_attention_backends(pack, monkeypatch, dtype, backend):
    """Flux's attention() uses the optimized_attention flux.math bound at import; swap it for both runs."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(flux_math, "optimized_attention", getattr(attention, f"attention_{backend}"))
    for kind in ("flux", "chroma"):
        model = ce.load_flux(ce.tiny_flux_state_dict(kind, seed=25), dtype=dtype)
        check_exact(pack, model, kind, cfg=3.0, kontext=kind == "flux", **VARIANTS[1])


def test_flux_models_are_flow_models(models, comfy):
    import comfy.model_sampling

    for name, model in models.items():
        assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST), name


@pytest.mark.parametrize("kind,cfg", [("flux", 1.0), ("chroma", 4.0)])
def test_pruning_saves_macs_and_stats_are_sane(pack, models, kind, cfg):
    steps, warmup, keep = 10, 3, 0.3
    patched = pack.nodes.patch.apply_cat(models[kind], pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=warmup, cooldown_steps=0))
    out = run(patched, kind, cfg=cfg, steps=steps)
    assert torch.isfinite(out).all()
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None
    assert stats.ledger.saved_fraction() > 0.30
    rows, n, k = (1 if cfg == 1.0 else 2), 64, round(keep * 64)
    assert [c.mode for c in stats.calls] == ["dense"] * (warmup - 1) + ["capture"] + ["pruned"] * (steps - warmup)
    assert [c.tokens_computed for c in stats.calls] == [rows * n] * warmup + [rows * k] * (steps - warmup)
    assert all(c.rows == rows and c.tokens_total == rows * n for c in stats.calls)
    assert [s["step"] for s in stats.steps()] == list(range(steps))
    assert set(stats.ledger.dense) == {"double_blocks", "single_blocks", "embed_and_final"}
    assert stats.ledger.computed["embed_and_final"] == stats.ledger.dense["embed_and_final"]
    assert stats.peak_cache_bytes > 0


def test_heun_calls_are_counted_per_step(pack, models):
    warmup = 3  # (with warm-up 2, step 0's corrector call is already a capture: the runtime learns
    #            the sampler's calls per step at the second callback)
    patched = pack.nodes.patch.apply_cat(models["flux"], settings(pack, keep_ratio=0.3, warmup_steps=warmup))
    out = run(patched, "flux", sampler="heun", kontext=True)
    assert torch.isfinite(out).all()
    stats = pack.nodes.patch.holder_of(patched).last_stats
    # heun: two model calls per sampler step except the last (next sigma 0), and the sampler
    # callback fires between a step's two calls; call j belongs to sampler step j // 2. Warm-up
    # counts whole sampler steps: steps 0..warmup-2 dense, step warmup-1 captures, later pruned.
    modes = [c.mode for c in stats.calls]
    assert len(modes) == 2 * STEPS - 1
    assert modes == ["dense"] * 2 * (warmup - 1) + ["capture"] * 2 + ["pruned"] * (2 * (STEPS - warmup) - 1)
    assert sum(s["calls"] for s in stats.steps()) == len(modes)


def test_kontext_reference_tokens_are_never_pruned(pack, models, monkeypatch):
    flux_blocks = pack.cat_core.blocks.flux
    seen, shapes = [], []
    call_indices = pack.cat_core.indices.CallIndices
    original_computed = call_indices.computed

    def spy_computed(self, n_txt, n_main, n_ref=0):
        found = original_computed(self, n_txt, n_main, n_ref)
        if n_txt:  # the attention sequence [text | main | reference] (not the image stream)
            seen.append((n_txt, n_main, n_ref, self.selection().count, found.index.clone()))
        return found

    ops = pack.nodes.patch.FLUX_OPS

    def spy_attention(q, k, v, heads, mask, opts):
        shapes.append((q.shape[2], k.shape[2]))
        return ops.attention(q, k, v, heads, mask, opts)

    monkeypatch.setattr(call_indices, "computed", spy_computed)
    spy_ops = flux_blocks.FluxOps(ops.apply_rope, spy_attention, ops.apply_mod)
    adapters = tuple(dataclasses.replace(a, host_ops=spy_ops) if a.name == "flux" else a for a in pack.nodes.patch.ADAPTERS)
    monkeypatch.setattr(pack.nodes.patch, "ADAPTERS", adapters)
    patched = pack.nodes.patch.apply_cat(models["flux"], settings(pack, keep_ratio=0.3))
    out = run(patched, "flux", batch=2, latent_hw=(12, 20), kontext=True)
    assert torch.isfinite(out).all()
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None

    n_main, n_ref, k = 6 * 10, 5 * 7, round(0.3 * 60)
    n_pruned = sum(c.mode == "pruned" for c in stats.calls)
    assert n_pruned == STEPS - WARMUP and len(seen) >= n_pruned
    for n_txt, main, ref, sel, idx in seen:
        assert (n_txt, main, ref, sel) == (TXT, n_main, n_ref, k)
        assert idx.shape == (2, TXT + k + n_ref)
        assert torch.equal(idx[:, :TXT], torch.arange(TXT).expand(2, -1))  # all text
        assert torch.equal(idx[:, -n_ref:], torch.arange(TXT + n_main, TXT + n_main + n_ref).expand(2, -1))  # all refs
        body = idx[:, TXT:TXT + k]
        assert ((body >= TXT) & (body < TXT + n_main)).all()  # the pruned part is main-image tokens only
    full = TXT + n_main + n_ref
    # 4 blocks per call (dense warm-up calls run ComfyUI's own blocks): the capture call attends
    # full x full, pruned calls (text + k + refs) queries x full keys
    assert shapes.count((full, full)) == 4
    assert shapes.count((TXT + k + n_ref, full)) == 4 * n_pruned
    assert len(shapes) == 4 * (1 + n_pruned)
    # reference tokens also cost img_in + final layer: counted, never pruned
    ref_macs = stats.ledger.computed["reference_tokens"]
    assert ref_macs == stats.ledger.dense["reference_tokens"] > 0


@pytest.mark.parametrize("kind,cfg,kontext", [("flux", 3.5, True), ("chroma", 4.0, False)])
def test_mac_ledger_matches_flop_counter(pack, models, comfy, kind, cfg, kontext):
    kw = dict(batch=2, latent_hw=(12, 20), cfg=cfg, kontext=kontext)
    plain, dense_counter = ce.with_flops(models[kind])
    run(plain, kind, **kw)
    patched, counter = ce.with_flops(pack.nodes.patch.apply_cat(models[kind], settings(pack, keep_ratio=0.3)))
    run(patched, kind, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.ledger.total_dense == sum(dense_counter.macs)
    assert stats.ledger.total_computed == sum(counter.macs)
    assert sum(counter.macs) < 0.8 * sum(dense_counter.macs)


def test_error_in_pruned_step_falls_back_to_exact_unpatched(pack, models, monkeypatch):
    reference = run(models["flux"], "flux", kontext=True)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pack.cat_core.blocks.flux, "pruned_single_block", broken)
    patched = pack.nodes.patch.apply_cat(models["flux"], settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, "flux", kontext=True), reference)
    assert "simulated failure" in pack.nodes.patch.holder_of(patched).last_stats.fallback_reason


def test_attention_patches_fall_back_to_exact_unpatched(pack, models):
    calls = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        calls.append(q.shape)
        return {}

    model = models["chroma"].clone()
    model.set_model_attn1_patch(attn1_patch)
    reference = run(model, "chroma", cfg=4.0)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, "chroma", cfg=4.0), reference)
    assert "attn1_patch" in pack.nodes.patch.holder_of(patched).last_stats.fallback_reason
    assert calls  # the patch ran (in ComfyUI's own blocks)


def test_previous_block_patches_are_refused(pack, models):
    """Another node's block patch cannot run on CAT's token subset: refused with a clear message."""
    def other_pack_patch(args, extra):
        return extra["original_block"](args)

    model = models["flux"].clone()
    model.set_model_patch_replace(other_pack_patch, "dit", "single_block", 1)
    with pytest.raises(ValueError, match="block patches from another node"):
        pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))


def _tiny_auraflow(comfy):
    """A ComfyUI AuraFlow model (a flow model with dit hooks but no CAT adapter), never run."""
    import comfy.supported_models

    config = comfy.supported_models.AuraFlow({"cond_seq_dim": 2048, "dim": 64, "n_layers": 2, "n_double_layers": 1,
                                              "n_heads": 2, "global_conddim": 64, "max_seq": 64})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_unsupported_models_are_refused_with_the_supported_list(pack, models, comfy):
    patch = pack.nodes.patch
    supported = r"supported: SD3.*Flux.*Chroma"
    with pytest.raises(patch.UnsupportedModelError, match=r"AuraFlow .*" + supported):
        patch.apply_cat(_tiny_auraflow(comfy), settings(pack))

    other = models["flux"].clone()
    other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(patch.UnsupportedModelError, match=r"\(Linear\); " + supported):
        patch.apply_cat(other, settings(pack))

    from comfy.ldm.chroma_radiance.model import ChromaRadiance

    radiance = models["chroma"].clone()
    radiance.add_object_patch("diffusion_model", ChromaRadiance.__new__(ChromaRadiance))
    with pytest.raises(patch.UnsupportedModelError, match=r"ChromaRadiance"):
        patch.apply_cat(radiance, settings(pack))

    once = patch.apply_cat(models["chroma"], settings(pack))
    with pytest.raises(ValueError, match="already has CAT Pruning"):
        patch.apply_cat(once, settings(pack))


def test_describe_reports_flux_and_chroma(pack, models):
    fb = pack.cat_core.blocks.flux
    info = fb.describe(models["flux"].model.diffusion_model)
    assert (info.arch, info.patch, info.num_blocks) == ("flux", 2, 4)
    info = fb.describe(models["chroma"].model.diffusion_model)
    assert (info.arch, info.patch, info.num_blocks) == ("chroma", 2, 4)
    assert fb.describe(models["flux2"].model.diffusion_model).patch == 1
    with pytest.raises(TypeError):
        fb.describe(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_first_double_block_keys_are_exact_after_a_pruned_call(pack, models, kind):
    """refresh_first_block: after a pruned call the first double block's cache equals a full
    computation on the same latent (roped keys included); the next block keeps stale rows."""
    model = models[kind]
    dm = model.get_model_object("diffusion_model")
    call_key = pack.cat_core.blocks.hooks.CALL_KEY
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 16, 16, generator=g)
    x1 = x0 + 0.5 * torch.randn(1, 16, 16, 16, generator=g)
    context = torch.randn(1, TXT, 64, generator=g)
    y = torch.randn(1, 64, generator=g) if kind == "flux" else None
    guidance = torch.tensor([3.5 if kind == "flux" else 0.0])

    def last_call(refresh, latents, timesteps):
        patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3, warmup_steps=1, refresh_first_block=refresh))
        hooks = patched.model_options["transformer_options"]["patches_replace"]
        run = pack.cat_core.PruningRun(patched.model_options["transformer_options"][pack.nodes.patch.HOLDER_KEY].settings,
                                       pack.cat_core.blocks.flux.describe(dm))
        with torch.no_grad():
            for step, (x, t) in enumerate(zip(latents, timesteps)):
                call = run.begin_call(x.shape, ("cond",), "cpu")
                out = dm(x, torch.tensor([t]), context, y=y, guidance=guidance,
                         transformer_options={"patches_replace": hooks, call_key: call})
                run.end_call(call, out)
                run.on_step_end(step)
        return call

    pruned = last_call(True, [x0, x1], [0.9, 0.7])
    full = last_call(True, [x1], [0.7])
    assert (pruned.mode.value, full.mode.value) == ("pruned", "capture")
    for name in ("k", "v"):
        assert torch.equal(getattr(pruned.layout.blocks[0], name), getattr(full.layout.blocks[0], name)), name
    assert not torch.allclose(pruned.layout.blocks[1].k, full.layout.blocks[1].k)
    off = last_call(False, [x0, x1], [0.9, 0.7])
    assert not torch.allclose(off.layout.blocks[0].k, full.layout.blocks[0].k)


@pytest.mark.parametrize("kind,pixels", [("flux", 8), ("flux2", 16)])
def test_stats_maps_match_the_decoded_image_size(pack, models, kind, pixels):
    """Flux.2 latents are 16 image pixels per latent pixel (SD3 / Flux: 8); the maps follow the model."""
    model = models[kind]
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    samples = {"samples": run(patched, kind, latent_hw=(6, 10))}
    out = pack.nodes.extension.CATStats.execute(patched, samples)
    for image in out.args[1:4]:  # refresh heatmap, staleness, clusters
        assert image.shape[1:] == (6 * pixels, 10 * pixels, 3)
