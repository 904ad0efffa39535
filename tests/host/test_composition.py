"""CAT Pruning composed with what users put around it: LoRA, ControlNet, Skip Layer Guidance,
other `dit` block patches, LazyCache, hook LoRAs and ModelSamplingSD3.

Each composition is checked the same way: at keep_ratio 1.0 the patched graph gives exactly the
latent of the same graph without CAT (so CAT neither drops nor doubles the other feature), and at
keep_ratio 0.3 it runs, stays finite, and the other feature still changes the result.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

STEPS, WARMUP = 6, 2




@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=31) for layout in ce.SD3_LAYOUTS}


def cat(pack, model, keep, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)  # short runs: prune to the last step so every case has pruned steps
    return pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=keep, **kw))


def stats_of(pack, model):
    return pack.nodes.patch.holder_of(model).last_stats


def run(model, *, positive=None, negative=None, batch=1, steps=STEPS, cfg=4.0, latent_hw=(16, 16), split=False,
        sampler="euler"):
    return ce.sample(model, seed=9, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                     positive=positive if positive is not None else ce.random_sd3_cond(1, batch),
                     negative=negative if negative is not None else ce.random_sd3_cond(2, batch),
                     batch=batch, latent_hw=latent_hw, force_split_cfg=split)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_pruned_run(pack, model, out):
    stats = stats_of(pack, model)
    assert torch.isfinite(out).all()
    assert stats.fallback_reason is None, stats.fallback_reason
    assert any(c.mode == "pruned" for c in stats.calls)
    return stats


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def _rand(shape, gen, scale=0.3):
    return torch.randn(shape, generator=gen) * scale


def tiny_lora(model, fmt: str, seed: int = 5, rank: int = 4) -> dict:
    """A LoRA state dict for the tiny model, in one of the key formats ComfyUI maps for SD3.

    "comfy": lora_unet_<module path with _>.lora_up/lora_down/alpha (kohya style);
    "diffusers": transformer.transformer_blocks.N.<diffusers name>.lora_A/lora_B, including
    to_q / add_k_proj / attn2.to_v that ComfyUI maps to slices of the fused qkv weights.
    Targets joint and context streams, attention and MLP, both blocks (and MMDiT-X attn2).
    """
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if fmt == "comfy":
        names = ["joint_blocks_0_x_block_attn_qkv", "joint_blocks_0_context_block_attn_qkv",
                 "joint_blocks_1_x_block_mlp_fc1", "joint_blocks_1_x_block_attn_proj"]
        for name in names:
            shape = weights[key_map[f"lora_unet_{name}"]].shape
            out[f"lora_unet_{name}.lora_down.weight"] = _rand((rank, shape[1]), gen)
            out[f"lora_unet_{name}.lora_up.weight"] = _rand((shape[0], rank), gen)
            out[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
        return out
    names = ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
             "transformer.transformer_blocks.1.ff.net.0.proj", "transformer.transformer_blocks.0.attn2.to_v"]
    for name in names:
        target = key_map[name]
        key = target[0] if isinstance(target, tuple) else target
        if key not in weights:  # attn2 exists only in MMDiT-X (SD3.5-medium)
            continue
        shape = list(weights[key].shape)
        if isinstance(target, tuple):  # (fused weight, (dim, offset, size))
            shape[target[1][0]] = target[1][2]
        out[f"{name}.lora_A.weight"] = _rand((rank, shape[1]), gen)
        out[f"{name}.lora_B.weight"] = _rand((shape[0], rank), gen)
    return out


def load_lora(model, lora_sd, mode="patch"):
    import comfy.sd

    loader = comfy.sd.load_lora_for_models if mode == "patch" else comfy.sd.load_bypass_lora_for_models
    patched, _ = loader(model, None, lora_sd, 1.0, 0)
    return patched


@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
@pytest.mark.parametrize("fmt,mode", [("comfy", "patch"), ("diffusers", "patch"), ("diffusers", "bypass")])
def test_lora_before_patch(pack, models, layout, fmt, mode):
    """Load Diffusion Model -> LoraLoaderModelOnly -> CAT Model Patch (the documented order)."""
    model = models[layout]
    lora_sd = tiny_lora(model, fmt)
    with_lora = load_lora(model, lora_sd, mode)
    n_patches = len(with_lora.patches) if mode == "patch" else len(lora_sd)
    assert n_patches >= 3  # every LoRA key was mapped to a weight of the tiny model
    plain, lora_ref = run(model), run(with_lora)
    assert max_diff(plain, lora_ref) > 1e-2, "the LoRA has no effect: test setup problem"

    exact = cat(pack, with_lora, 1.0)
    assert torch.equal(run(exact), lora_ref)

    pruned = cat(pack, with_lora, 0.3)
    out = run(pruned)
    assert_pruned_run(pack, pruned, out)
    assert max_diff(out, run(cat(pack, model, 0.3))) > 1e-2, "the LoRA is lost at keep 0.3"
    # the LoRA patches stay on the patched clone only; the input models are untouched
    assert torch.equal(run(model), plain)


def test_lora_after_patch_works_too(pack, models):
    """The README asks for LoRA loaders before the patch; a LoRA loaded after it still applies."""
    model = models["sd35_large"]
    lora_sd = tiny_lora(model, "comfy")
    lora_ref = run(load_lora(model, lora_sd))
    after = load_lora(cat(pack, model, 1.0), lora_sd)
    assert torch.equal(run(after), lora_ref)
    pruned = load_lora(cat(pack, model, 0.3), lora_sd)
    out = run(pruned)
    assert_pruned_run(pack, pruned, out)
    assert torch.equal(out, run(cat(pack, load_lora(model, lora_sd), 0.3)))


def test_hook_lora_on_one_cond(pack, models):
    """A scheduled/hook LoRA on the positive prompt only (Create Hook LoRA + Cond Set Props):
    cond and uncond then run as separate model calls with different weights."""
    import comfy.hooks

    model = models["sd3"]
    hooks = comfy.hooks.create_hook_lora(tiny_lora(model, "comfy"), 1.0, 1.0)
    positive = comfy.hooks.set_conds_props([ce.random_sd3_cond(1)], 1.0, "default", hooks=hooks)[0]
    reference = run(model, positive=positive)
    assert max_diff(reference, run(model)) > 1e-2
    assert torch.equal(run(cat(pack, model, 1.0), positive=positive), reference)
    pruned = cat(pack, model, 0.3)
    out = run(pruned, positive=positive)
    stats = assert_pruned_run(pack, pruned, out)
    assert sum(c.mode == "pruned" for c in stats.calls) == 2 * (STEPS - WARMUP)  # cond and uncond calls
    assert torch.equal(run(model), run(model)), "the hook weights leaked into the base model"


# --------------------------------------------------------------------------------------------
# SD3 ControlNet
# --------------------------------------------------------------------------------------------
class FakeVAE:
    """Stands in for the SD3 VAE that ControlNetApplySD3 needs to encode the hint image."""

    def spacial_compression_encode(self):
        return 8

    def encode(self, pixels):  # [B, H, W, 3] in [0, 1] -> [B, 16, H/8, W/8]
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)
        mix = torch.linspace(-1.0, 1.0, 16 * 3).view(16, 3)
        return torch.einsum("oc,bchw->bohw", mix, x)


def tiny_sd3_controlnet(model, seed=3):
    """A random SD3 ControlNet (diffusers format, as the InstantX / Stability SD3 ControlNets ship)
    for the tiny SD3, loaded by ComfyUI's own comfy.controlnet.load_controlnet_state_dict."""
    import comfy.cldm.mmdit
    import comfy.controlnet
    import comfy.ops
    import comfy.utils

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "dtype"}
    depth = config["depth"]
    shapes = {k: v.shape for k, v in comfy.cldm.mmdit.ControlNet(
        num_blocks=depth, control_latent_channels=16, operations=comfy.ops.disable_weight_init, device="cpu",
        dtype=torch.float32, **config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)

    def fill(shape):
        if len(shape) > 1:
            return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        return torch.randn(shape, generator=gen) * 0.02

    sd, covered = {}, set()
    for diffusers_key, target in comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": depth}).items():
        comfy_key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if comfy_key not in shapes:
            continue
        shape = list(shapes[comfy_key])
        if offset is not None:
            shape[offset[0]] = offset[2]
        sd[diffusers_key] = fill(shape)
        covered.add(comfy_key)
    for key, shape in shapes.items():  # ControlNet-only weights keep their names
        if key.startswith(("controlnet_blocks.", "pos_embed_input.")):
            sd[key] = fill(shape)
            covered.add(key)
    assert covered == set(shapes), sorted(set(shapes) - covered)
    control = comfy.controlnet.load_controlnet_state_dict(sd)
    assert isinstance(control.control_model, comfy.cldm.mmdit.ControlNet)
    return control


def apply_controlnet(control, positive, negative, hw, start=0.0, end=1.0, strength=1.0):
    import comfy_extras.nodes_sd3 as nodes_sd3

    image = torch.rand(1, hw[0] * 8, hw[1] * 8, 3, generator=torch.Generator().manual_seed(4))
    out = nodes_sd3.ControlNetApplySD3.execute(positive, negative, control, image, strength, start, end, vae=FakeVAE())
    return out.args


@pytest.fixture(scope="module")
def controlnet(models):
    return tiny_sd3_controlnet(models["sd3"])


@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
@pytest.mark.parametrize("window", ["whole_run", "pruned_steps_only"])
def test_sd3_controlnet(pack, models, controlnet, split, window):
    """Apply Controlnet with VAE on an SD3 model. "pruned_steps_only": the ControlNet acts only in
    the second half of the schedule (after warm-up), so any effect at keep 0.3 must come through
    the pruned calls: its residuals reach the recomputed tokens."""
    model, hw, batch = models["sd3"], (16, 16), 2
    start = 0.0 if window == "whole_run" else 0.5
    pos, neg = ce.random_sd3_cond(1, batch), ce.random_sd3_cond(2, batch)
    cpos, cneg = apply_controlnet(controlnet, pos, neg, hw, start=start)
    kw = dict(batch=batch, latent_hw=hw, split=split)

    plain = run(model, positive=pos, negative=neg, **kw)
    reference = run(model, positive=cpos, negative=cneg, **kw)
    assert max_diff(plain, reference) > 1e-2, "the ControlNet has no effect: test setup problem"
    assert torch.equal(run(cat(pack, model, 1.0), positive=cpos, negative=cneg, **kw), reference)

    pruned = cat(pack, model, 0.3)
    out = run(pruned, positive=cpos, negative=cneg, **kw)
    stats = assert_pruned_run(pack, pruned, out)
    without = run(cat(pack, model, 0.3), positive=pos, negative=neg, **kw)
    assert max_diff(out, without) > 1e-2, "the ControlNet residuals do not reach the pruned computation"
    if window == "pruned_steps_only":  # setup check: the ControlNet is off during warm-up, on after it
        import comfy.samplers

        sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)
        threshold = sampling.percent_to_sigma(start)
        assert all(s > threshold for s in sigmas[:WARMUP]) and any(s <= threshold for s in sigmas[WARMUP:-1])
        assert all(c.mode != "pruned" for c in stats.calls[:WARMUP * (2 if split else 1)])


# --------------------------------------------------------------------------------------------
# Skip Layer Guidance and other `dit` replace patches on the same blocks
# --------------------------------------------------------------------------------------------
def slg_sd3(model, layers="1"):
    import comfy_extras.nodes_sd3 as nodes_sd3

    return nodes_sd3.SkipLayerGuidanceSD3.execute(model, layers, 3.0, 0.0, 1.0).args[0]


def slg_dit(model):
    import comfy_extras.nodes_slg as nodes_slg

    return nodes_slg.SkipLayerGuidanceDiT.execute(model, 2.5, 0.0, 1.0, double_layers="0", single_layers="",
                                                  rescaling_scale=0.5).args[0]


def slg_simple(model):
    import comfy_extras.nodes_slg as nodes_slg

    return nodes_slg.SkipLayerGuidanceDiTSimple.execute(model, 0.0, 1.0, double_layers="1", single_layers="").args[0]


SLG_NODES = {"SkipLayerGuidanceSD3": slg_sd3, "SkipLayerGuidanceDiT": slg_dit, "SkipLayerGuidanceDiTSimple": slg_simple}


@pytest.mark.parametrize("layout", ["sd3", "sd35_medium"])
@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
@pytest.mark.parametrize("node", list(SLG_NODES))
def test_skip_layer_guidance_chains_in_both_orders(pack, models, layout, split, node):
    """SLG replaces the skipped blocks' `dit` patch for its extra evaluation only: CAT's hooks on
    the other blocks stay, the skipped block is skipped. Same result whichever node comes first."""
    model, slg = models[layout], SLG_NODES[node]
    reference = run(slg(model), split=split)
    assert max_diff(reference, run(model, split=split)) > 1e-2, "SLG has no effect: test setup problem"
    assert torch.equal(run(cat(pack, slg(model), 1.0), split=split), reference), "SLG -> CAT"
    assert torch.equal(run(slg(cat(pack, model, 1.0)), split=split), reference), "CAT -> SLG"
    for pruned in (cat(pack, slg(model), 0.3), slg(cat(pack, model, 0.3))):
        out = run(pruned, split=split)
        assert_pruned_run(pack, pruned, out)


def test_split_cfg_matches_batched_cfg_at_keep_03(pack, models):
    """Control for the SLG test below: without SLG, cond/uncond split into separate calls give
    the batched result up to float rounding (each chunk has its own caches and selection) when
    the CFG halves are not paired (pairing needs both halves in one call)."""
    model = models["sd3"]
    batched = run(cat(pack, model, 0.3, pair_cfg=False))
    split = run(cat(pack, model, 0.3, pair_cfg=False), split=True)
    assert max_diff(batched, split) < 1e-3


def test_slg_extra_evaluation_does_not_share_cond_caches(pack, models):
    model = models["sd3"]
    batched = run(slg_sd3(cat(pack, model, 0.3, pair_cfg=False)))
    split_model = slg_sd3(cat(pack, model, 0.3, pair_cfg=False))
    split = run(split_model, split=True)
    stats = stats_of(pack, split_model)
    # uncond, cond and SLG-cond: three layouts with their own caches (batched has two: uncond+cond, SLG-cond)
    assert max_diff(batched, split) < 1e-3, f"split vs batched differ by {max_diff(batched, split):.3g}; " \
                                            f"{len(stats.refresh_maps)} layouts"


def _other_patch_adds(args, extra):
    out = extra["original_block"](args)
    out["img"] = out["img"] + 0.05 * out["img"].roll(1, dims=1)  # a visible change to the block output
    return out


def _other_patch_identity(args, extra):
    return extra["original_block"](args)


def with_block_patch(model, fn, block=0):
    patched = model.clone()
    patched.set_model_patch_replace(fn, "dit", "double_block", block)
    return patched


@pytest.mark.parametrize("fn", [_other_patch_adds, _other_patch_identity], ids=["altering", "pass-through"])
def test_existing_dit_patch_is_refused_with_a_clear_message(pack, models, fn):
    """A patch already on a block cannot run on CAT's token subset: CAT refuses instead of dropping it."""
    model = with_block_patch(models["sd3"], fn)
    with pytest.raises(ValueError, match="block patches from another node"):
        cat(pack, model, 1.0)


def test_dit_patch_added_after_cat_is_exact_at_keep_1(pack, models):
    """A patch set after CAT replaces CAT's hook on that block (ComfyUI: last writer wins); at keep
    1.0 that is still the unpatched result."""
    model = models["sd3"]
    reference = run(with_block_patch(model, _other_patch_adds))
    assert torch.equal(run(with_block_patch(cat(pack, model, 1.0), _other_patch_adds)), reference)


def test_identity_dit_patch_after_cat_is_chained_or_refused(pack, models):
    model = models["sd3"]
    expected = run(cat(pack, model, 0.3))
    patched = with_block_patch(cat(pack, model, 0.3), _other_patch_identity)
    try:
        out = run(patched)
    except Exception as error:  # a refusal is acceptable if it names the conflict
        assert "patch" in str(error).lower()
        return
    stats = stats_of(pack, patched)
    chained = torch.equal(out, expected)
    fell_back = stats.fallback_reason is not None and torch.equal(out, run(model))
    assert chained or fell_back, f"neither chained nor refused: max |diff| {max_diff(out, expected):.3g}, " \
                                 f"fallback {stats.fallback_reason!r}"


# --------------------------------------------------------------------------------------------
# LazyCache, ModelSamplingSD3
# --------------------------------------------------------------------------------------------
def lazycache(model):
    import comfy_extras.nodes_easycache as nodes_easycache

    return nodes_easycache.LazyCacheNode.execute(model, 0.2, 0.15, 0.95, False).args[0]


@pytest.mark.parametrize("order", ["cat_then_lazycache", "lazycache_then_cat"])
@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
def test_lazycache(pack, models, order, split):
    """LazyCache (OUTER_SAMPLE + PREDICT_NOISE) skips whole model evaluations; CAT counts steps by the
    sampler's callback, so skipped steps do not confuse its warm-up."""
    model, steps = models["sd35_medium"], 12

    def compose(keep):
        return lazycache(cat(pack, model, keep)) if order == "cat_then_lazycache" else cat(pack, lazycache(model), keep)

    reference = run(lazycache(model), steps=steps, split=split)
    assert max_diff(reference, run(model, steps=steps, split=split)) > 1e-3, "LazyCache skipped nothing: setup"
    assert torch.equal(run(compose(1.0), steps=steps, split=split), reference)
    pruned = compose(0.3)
    out = run(pruned, steps=steps, split=split)
    stats = stats_of(pack, pruned)
    assert torch.isfinite(out).all() and stats.fallback_reason is None
    assert len(stats.calls) < steps * (2 if split else 1), "LazyCache skipped no model call"


@pytest.mark.parametrize("order", ["before", "after"])
def test_model_sampling_sd3_shift(pack, models, order):
    """ModelSamplingSD3 (shift) is an object patch on model_sampling: kept by CAT in either order."""
    import comfy_extras.nodes_model_advanced as nodes_model_advanced

    def shift(m):
        return nodes_model_advanced.ModelSamplingSD3().patch(m, 6.0)[0]

    model = models["sd35_large"]
    reference = run(shift(model))
    assert max_diff(reference, run(model)) > 1e-2
    composed = cat(pack, shift(model), 1.0) if order == "before" else shift(cat(pack, model, 1.0))
    assert torch.equal(run(composed), reference)
