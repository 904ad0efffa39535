"""CAT Pruning on HunyuanImage 2.1 and Flux.2 Klein inside ComfyUI's sampler (host tier).

Tiny seeded random models built from state dicts through ComfyUI's own detection
(tests/host/comfy_env_hunyuan.py): HunyuanImage 2.1 (base: byT5 glyph mapper; distilled: also
guidance and meanflow embedders; patch 1 over a 64-channel latent) and a Klein-layout Flux.2
(1 double + 4 single blocks, no guidance embedder, 512 padded text tokens).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.host import comfy_env as ce
from tests.host import comfy_env_hunyuan as ch
from tests.host.test_exact_any_keep import RECORD_KEY, RTOL, SIGMA, Outputs

pytestmark = pytest.mark.host

STEPS, WARMUP = 5, 2
TXT = 8


@pytest.fixture(scope="module")
def models(comfy):
    return {
        "image": ch.tiny_hunyuan("image", seed=51),
        "image_distilled": ch.tiny_hunyuan("image_distilled", seed=52),
        "klein": ch.tiny_klein(seed=53),
    }


def settings(pack, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)  # these short runs test the pruned steps
    return pack.cat_core.CATSettings(**kw)


def channels(kind):
    return ch.KLEIN_LATENT_CHANNELS if kind == "klein" else ch.LATENT_CHANNELS


def conds(kind, batch, *, pad=0, byt5=0):
    """(positive, negative). pad: the positive prompt's padded text tokens (the attention mask);
    the negative is then 2 tokens shorter and unpadded, so ComfyUI runs it in its own call
    (ComfyUI 0.16.4's HunyuanVideo forward builds a one-row mask: batched masked rows fail there)."""
    if kind == "klein":
        return tuple(ce.flux_cond(seed, batch, tokens=TXT, context_dim=96, vec_dim=None, guidance=None) for seed in (1, 2))
    guidance = 6.0 if kind == "image_distilled" else None
    pos = ch.hunyuan_cond(1, batch, tokens=TXT, pad=pad, byt5_tokens=byt5, guidance=guidance)
    neg = ch.hunyuan_cond(2, batch, tokens=TXT - 2 if pad else TXT, byt5_tokens=byt5, guidance=guidance)
    return pos, neg


def run(model, kind, *, batch=1, latent_hw=(6, 8), cfg=1.0, sampler="euler", steps=STEPS, seed=5, **cond_kw):
    pos, neg = conds(kind, batch, **cond_kw)
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                     positive=pos, negative=neg, latent_image=torch.zeros(batch, channels(kind), *latent_hw))


def check_exact(pack, model, kind, **kw):
    reference = run(model, kind, **kw)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    out = run(patched, kind, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None, stats.fallback_reason
    assert not stats.notes, stats.notes
    assert {c.mode for c in stats.calls} == {"dense", "capture", "pruned"}, "keep 1.0 must still run pruned calls"
    assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max().item()}"
    return stats


SHAPES = {"square": (6, 6), "wide": (5, 9)}  # patch 1: 36 / 45 tokens


# ------------------------------------------------------------------------------ keep 1.0: bit for bit
@pytest.mark.parametrize("kind,batch,cfg,shape", list(itertools.product(
    ["image", "image_distilled", "klein"], [1, 2], [1.0, 4.0], SHAPES)))
def test_keep_ratio_one_is_exact(pack, models, kind, batch, cfg, shape):
    byt5 = 3 if kind == "image" else 0  # a quoted text in the prompt: glyph tokens join the text stream
    stats = check_exact(pack, models[kind], kind, batch=batch, cfg=cfg, latent_hw=SHAPES[shape], byt5=byt5)
    rows = batch * (2 if cfg > 1 else 1)
    assert all(c.rows == rows for c in stats.calls)


@pytest.mark.parametrize("kind,cfg,sampler,shape", [("image", 1.0, "euler", "square"), ("image", 4.0, "heun", "wide"),
                                                    ("image_distilled", 4.0, "euler", "wide")])
def test_keep_ratio_one_is_exact_with_padded_text(pack, models, kind, cfg, sampler, shape):
    """The text padding mask is active (a [1, 1, L] key bias in every block and the refiner's mask)."""
    stats = check_exact(pack, models[kind], kind, cfg=cfg, sampler=sampler, latent_hw=SHAPES[shape], pad=3)
    assert all(c.rows == 1 for c in stats.calls)  # with cfg, the padded cond runs in its own call


def test_padded_text_reaches_the_blocks_as_a_key_mask(pack, models, monkeypatch):
    """The mask the pruned blocks hand to attention: the host's [1, 1, L] bias, -max on the pad keys."""
    flux_blocks = pack.cat_core.blocks.flux
    seen = []
    ops = pack.nodes.patch.FLUX_OPS

    def spy_attention(q, k, v, heads, mask, opts):
        seen.append((q.shape[2], k.shape[2], None if mask is None else mask.clone()))
        return ops.attention(q, k, v, heads, mask, opts)

    spy = flux_blocks.FluxOps(ops.apply_rope, spy_attention, ops.apply_mod)
    import dataclasses
    adapters = tuple(dataclasses.replace(a, host_ops=spy) if a.name == "hunyuan_image" else a for a in pack.nodes.patch.ADAPTERS)
    monkeypatch.setattr(pack.nodes.patch, "ADAPTERS", adapters)
    patched = pack.nodes.patch.apply_cat(models["image"], settings(pack, keep_ratio=0.3))
    out = run(patched, "image", latent_hw=(6, 6), pad=3)
    assert torch.isfinite(out).all()
    assert pack.nodes.patch.holder_of(patched).last_stats.fallback_reason is None
    n = TXT + 36
    pruned = [s for s in seen if s[0] < s[1]]
    assert pruned and all(q == TXT + round(0.3 * 36) and k == n for q, k, _ in pruned)
    for _, _, mask in seen:
        assert mask.shape == (1, 1, n)
        assert (mask[0, 0, TXT - 3:TXT] < -1e30).all() and (mask[0, 0, :TXT - 3] == 0).all() and (mask[0, 0, TXT:] == 0).all()


# ------------------------------------------------------------------------------ any keep: exact caches
BATCHES = {"one": (1, 1.0), "cfg_pair": (1, 4.0), "two_images": (2, 1.0)}
ANY_KEEP = list(itertools.product(["image", "image_distilled", "klein"], [0.3, 0.55], [True, False], BATCHES, SHAPES))


def capture_then_prune(pack, comfy, model, kind, *, keep, refresh, batch, latent_hw, pad=0, byt5=0):
    """Two euler steps at one sigma (dt = 0): step 0 captures, step 1 prunes on the same input."""
    recorder = Outputs()
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RECORD_KEY, recorder)
    s = pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=1, cooldown_steps=0, refresh_first_block=refresh)
    patched = pack.nodes.patch.apply_cat(recorded, s)
    images, cfg = BATCHES[batch]
    pos, neg = conds(kind, images, pad=pad, byt5=byt5)
    latent = torch.zeros(images, channels(kind), *latent_hw)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        comfy.sample.sample_custom(patched, noise, cfg, comfy.samplers.sampler_object("euler"),
                                   torch.tensor([SIGMA, SIGMA, 0.0]), pos, neg, latent, disable_pbar=True, seed=5)
    return recorder.calls, pack.nodes.patch.holder_of(patched).last_stats


def check_pruned_reproduces_capture(calls, stats, keep, tokens):
    assert stats.fallback_reason is None, stats.fallback_reason
    half = len(calls) // 2
    assert [c.mode for c in stats.calls] == ["capture"] * half + ["pruned"] * half
    for i in range(half):
        (x0, capture), (x1, out) = calls[i], calls[half + i]
        pruned = stats.calls[half + i]
        assert torch.equal(x0, x1), "the pruned call must see the capture call's input"
        assert 0 < pruned.tokens_computed == pruned.rows * round(keep * tokens) < pruned.tokens_total
        fresh = stats.selection_masks[i][0]  # [rows, h, w] (patch 1: one token per latent pixel)
        assert 0 < fresh.sum() < fresh.numel()
        mask = fresh[:, None].expand_as(capture)
        scale = capture.abs().max().item()
        diff = (out - capture).abs()
        assert diff[mask].max().item() <= RTOL * scale, f"recomputed tokens differ by {diff[mask].max().item():.3g}"
        assert diff[~mask].max().item() <= RTOL * scale, f"cached tokens differ by {diff[~mask].max().item():.3g}"


@pytest.mark.parametrize("kind,keep,refresh,batch,shape", ANY_KEEP)
def test_pruned_call_on_the_capture_input_reproduces_the_capture_output(pack, comfy, models, kind, keep, refresh, batch, shape):
    latent_hw = SHAPES[shape]
    calls, stats = capture_then_prune(pack, comfy, models[kind], kind, keep=keep, refresh=refresh, batch=batch,
                                      latent_hw=latent_hw, byt5=3 if kind == "image" else 0)
    assert len(calls) == 2
    check_pruned_reproduces_capture(calls, stats, keep, latent_hw[0] * latent_hw[1])


@pytest.mark.parametrize("batch,keep", [("one", 0.3), ("cfg_pair", 0.55)])
def test_pruned_call_with_padded_text_reproduces_the_capture_output(pack, comfy, models, batch, keep):
    calls, stats = capture_then_prune(pack, comfy, models["image_distilled"], "image_distilled", keep=keep, refresh=True,
                                      batch=batch, latent_hw=SHAPES["wide"], pad=3)
    assert len(calls) == (4 if batch == "cfg_pair" else 2)  # padded cond and unpadded uncond: own calls
    check_pruned_reproduces_capture(calls, stats, keep, 45)


# ------------------------------------------------------------------------------ MACs
@pytest.mark.parametrize("kind,kw", [("image", dict(batch=2, cfg=4.0, byt5=3)), ("image_distilled", dict(cfg=4.0, pad=3)),
                                     ("klein", dict(batch=2, cfg=4.0))])
def test_mac_ledger_matches_flop_counter(pack, models, comfy, kind, kw):
    kw = dict(latent_hw=SHAPES["wide"], **kw)
    plain, dense_counter = ce.with_flops(models[kind])
    run(plain, kind, **kw)
    patched, counter = ce.with_flops(pack.nodes.patch.apply_cat(models[kind], settings(pack, keep_ratio=0.3)))
    run(patched, kind, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None
    assert stats.ledger.total_dense == sum(dense_counter.macs)
    assert stats.ledger.total_computed == sum(counter.macs)
    assert sum(counter.macs) < sum(dense_counter.macs)  # (Klein: 512 text tokens against 45 image tokens)
    if kind != "klein":
        assert stats.ledger.computed["text_in"] == stats.ledger.dense["text_in"] > 0


def test_text_path_macs_split_llm_and_glyph_tokens(pack, models):
    """The token refiner runs on the LLM tokens only and the byT5 mapper on the glyph tokens."""
    hy = pack.cat_core.blocks.hunyuan
    shape = hy.outer_shape(models["image"].get_model_object("diffusion_model"))
    assert shape.byt5_per_token == 1472 * 2048 + 2048 * 2048 + 2048 * 256
    assert shape.refiner_blocks == 2 and shape.dim == 256
    d = 256
    assert shape.refiner_per_token == 64 * d + 2 * (3 * d * d + d * d + 8 * d * d)
    with_glyphs = hy.text_path_macs(shape, 1, TXT, 3)
    assert with_glyphs - hy.text_path_macs(shape, 1, TXT, 0) == 3 * shape.byt5_per_token
    assert hy.text_path_macs(shape, 2, TXT, 3) == 2 * with_glyphs


# ------------------------------------------------------------------------------ lean path, flow, stats
@pytest.mark.parametrize("kind", ["image_distilled", "klein"])
def test_lean_blocks_give_the_module_result_bit_for_bit(pack, models, kind):
    def patched_run(block_math):
        m = pack.nodes.patch.apply_cat(models[kind], settings(pack, keep_ratio=0.3, block_math=block_math))
        return run(m, kind, cfg=4.0, latent_hw=SHAPES["wide"]), pack.nodes.patch.holder_of(m).last_stats

    (lean, stats), (modules, _) = patched_run("lean"), patched_run("modules")
    assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
    assert torch.equal(lean, modules)
    dm = models[kind].get_model_object("diffusion_model")
    blocks = len(dm.double_blocks) + len(dm.single_blocks)
    assert stats.block_math == {"setting": "lean", "lean_blocks": blocks, "blocks": blocks, "module_layers": {}}


def test_models_are_flow_models_detected_as_expected(pack, models, comfy):
    import comfy.model_sampling

    assert type(models["image"].model).__name__ == type(models["image_distilled"].model).__name__ == "HunyuanImage21"
    assert type(models["klein"].model).__name__ == "Flux2"
    klein = models["klein"].get_model_object("diffusion_model")
    assert (len(klein.double_blocks), len(klein.single_blocks), klein.params.guidance_embed) == (1, 4, False)
    for model in models.values():
        assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    assert [a.name for a in pack.nodes.patch.ADAPTERS if isinstance(models["image"].get_model_object("diffusion_model"), a.model_classes)] == ["hunyuan_image"]
    info = pack.cat_core.blocks.hunyuan.describe(models["image"].get_model_object("diffusion_model"))
    assert (info.arch, info.patch, info.num_blocks) == ("hunyuan_image", 1, 4)


def test_pruning_saves_macs_and_stats_maps_follow_the_32x_latent(pack, models):
    steps, warmup, keep = 8, 3, 0.3
    patched = pack.nodes.patch.apply_cat(models["image"], settings(pack, keep_ratio=keep, warmup_steps=warmup))
    samples = {"samples": run(patched, "image", steps=steps, latent_hw=(4, 7), cfg=4.0)}
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None and stats.ledger.saved_fraction() > 0.2
    k = round(keep * 28)
    assert [c.tokens_computed for c in stats.calls] == [2 * 28] * warmup + [2 * k] * (steps - warmup)
    out = pack.nodes.extension.CATStats.execute(patched, samples)
    for image in out.args[1:4]:  # one token = one latent pixel = 32 x 32 image pixels
        assert image.shape[1:] == (4 * 32, 7 * 32, 3)


def test_klein_at_its_four_distilled_steps_with_the_defaults_prunes_nothing(pack, models):
    """Klein's distilled use: 4 steps, cfg 1. The default warm-up (8) leaves nothing to prune."""
    reference = run(models["klein"], "klein", steps=4)
    patched = pack.nodes.patch.apply_cat(models["klein"], pack.cat_core.CATSettings())
    out = run(patched, "klein", steps=4)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert [c.mode for c in stats.calls] == ["dense"] * 4
    assert stats.ledger.saved_fraction() == 0.0
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------ real configurations
@pytest.mark.parametrize("name", sorted(ch.KLEIN_CONFIGS))
def test_real_klein_configurations_are_detected_as_flux2(pack, comfy, name):
    """ComfyUI's detection reads Klein's width and depth from the checkpoint (meta tensors here)."""
    import comfy.model_detection as md

    sd = ch.klein_meta_state_dict(name)
    config = md.detect_unet_config(sd, "")
    assert type(md.model_config_from_unet_config(config, sd)).__name__ == "Flux2"
    want = ch.KLEIN_CONFIGS[name]
    got = {"hidden": config["hidden_size"], "heads": config["num_heads"], "depth": config["depth"],
           "depth_single": config["depth_single_blocks"], "context_dim": config["context_in_dim"]}
    assert got == want and config["guidance_embed"] is False


@pytest.mark.parametrize("layout", ["image", "image_distilled"])
def test_real_hunyuan_image_21_is_detected_and_described(pack, comfy, layout):
    import comfy.model_detection as md

    sd = ch.hunyuan_meta_state_dict(layout)
    config = md.detect_unet_config(sd, "")
    assert type(md.model_config_from_unet_config(config, sd)).__name__ == "HunyuanImage21"
    assert config["patch_size"] == [1, 1] and config["guidance_embed"] is (layout == "image_distilled")
    dm = ch.hunyuan_module(layout, device="meta", **ch.HUNYUAN_IMAGE_21)
    info = pack.cat_core.blocks.hunyuan.describe(dm)
    assert (info.patch, info.num_blocks) == (1, 60)


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("layout,model_class", [("refiner", "HunyuanImage21Refiner"), ("video", "HunyuanVideo")])
def test_video_latent_variants_are_refused_naming_the_reason(pack, layout, model_class):
    model = ch.tiny_hunyuan(layout, seed=54, depth=1, depth_single=1)
    assert type(model.model).__name__ == model_class
    with pytest.raises(pack.nodes.patch.UnsupportedModelError, match=r"3-D \(video\) latents.*Supported: .*HunyuanImage 2\.1"):
        pack.nodes.patch.apply_cat(model, settings(pack))


def test_the_node_shows_the_refusal_as_a_message(pack):
    model = ch.tiny_hunyuan("refiner", seed=55, depth=1, depth_single=1)
    with pytest.raises(ValueError, match=r"CAT Model Patch: .*patch size \[1, 1, 1\]"):
        pack.nodes.extension.CATModelPatch.execute(model)


def test_per_token_modulation_from_the_model_runs_unpruned(pack, models):
    """A guiding-frame call (HunyuanVideo's modulation_dims) cannot be pruned: the pruned block
    refuses it, so the model call falls back to the unpatched computation."""
    flux_blocks = pack.cat_core.blocks.flux
    for key in ("modulation_dims_img", "modulation_dims_txt", "modulation_dims"):
        with pytest.raises(flux_blocks.FluxPruningUnsupported, match=key):
            flux_blocks._check_given_dims({key: [(0, 4, 0), (4, None, 1)]})
    flux_blocks._check_given_dims({"modulation_dims_img": None, "modulation_dims": None})


def test_an_error_in_a_pruned_step_falls_back_to_the_exact_unpatched_image(pack, models, monkeypatch):
    reference = run(models["image"], "image", byt5=3)

    def refuse(args):
        raise pack.cat_core.blocks.flux.FluxPruningUnsupported("per-token modulation ranges from the model (modulation_dims)")

    monkeypatch.setattr(pack.cat_core.blocks.flux, "_check_given_dims", refuse)
    patched = pack.nodes.patch.apply_cat(models["image"], settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, "image", byt5=3), reference)
    assert "modulation_dims" in pack.nodes.patch.holder_of(patched).last_stats.fallback_reason
