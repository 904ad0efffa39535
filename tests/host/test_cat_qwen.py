"""CAT Pruning inside ComfyUI's real sampler loop on Qwen-Image and Qwen-Image-Edit (host tier).

Tiny seeded random models in ComfyUI's own classes (2 joint blocks, 2 heads x 32), built through
ComfyUI's detection (tests/host/comfy_env_qwen.py). Latents are 5-D [B, 16, 1, H, W]. Edit runs
with reference latents (ReferenceLatent's `reference_latents`), 2511 with reference tokens
modulated at t = 0 ("index_timestep_zero"); the text attention mask is the Qwen text encoder's.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.host import comfy_env as ce
from tests.host import comfy_env_qwen as cq
from tests.host.test_exact_any_keep import RTOL, Outputs

pytestmark = pytest.mark.host

STEPS, WARMUP = 5, 2
TXT = 8
REF_HW = (10, 14)  # 5 x 7 = 35 reference tokens, a different size from the image


@pytest.fixture(scope="module")
def models(comfy):
    return {"qwen": cq.tiny_qwen(seed=51), "edit_2511": cq.tiny_qwen(seed=52, edit_2511=True)}


def settings(pack, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("cooldown_steps", 0)  # these short runs test the pruned steps: prune to the last step
    return pack.cat_core.CATSettings(**kw)


def conds(batch=1, *, refs=0, masked=0, method=None):
    references = [cq.reference_latent(REF_HW, seed=77 + i) for i in range(refs)] or None
    return tuple(cq.qwen_cond(seed, batch, tokens=TXT, reference_latents=references, masked_tokens=masked,
                              reference_latents_method=method) for seed in (1, 2))


def run(model, *, batch=1, latent_hw=(16, 16), cfg=1.0, sampler="euler", steps=STEPS, seed=5, frames=1, split=False, **cond_kw):
    pos, neg = conds(batch, **cond_kw)
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple", positive=pos,
                     negative=neg, latent_image=cq.empty_latent(batch, latent_hw, frames), force_split_cfg=split)


def stats_of(pack, model):
    return pack.nodes.patch.holder_of(model).last_stats


def check_exact(pack, model, **kw):
    reference = run(model, **kw)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=1.0))
    out = run(patched, **kw)
    stats = stats_of(pack, patched)
    assert {c.mode for c in stats.calls} == {"dense", "capture", "pruned"}, "keep 1.0 must still run pruned calls"
    assert stats.fallback_reason is None and not stats.notes
    assert out.shape == reference.shape == (kw.get("batch", 1), 16, 1, *kw.get("latent_hw", (16, 16)))
    assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max().item()}"
    return stats


SHAPES = {"square": (16, 16), "wide": (12, 20)}


@pytest.mark.parametrize("edit,batch,cfg,shape", list(itertools.product([False, True], [1, 2], [1.0, 4.0], SHAPES)))
def test_keep_ratio_one_is_exact(pack, models, edit, batch, cfg, shape):
    """Qwen-Image, and Qwen-Image-Edit with a reference latent: bit for bit the unpatched latent."""
    check_exact(pack, models["qwen"], batch=batch, cfg=cfg, latent_hw=SHAPES[shape], refs=int(edit))


@pytest.mark.parametrize("case", ["edit_2511", "two_refs_offsets", "text_mask", "odd_size", "heun_split_cfg"])
def test_other_variants_keep_ratio_one_is_exact(pack, models, case):
    if case == "edit_2511":  # reference tokens modulated at t = 0: timestep_zero_index inside the blocks
        check_exact(pack, models["edit_2511"], batch=2, cfg=3.0, latent_hw=(12, 20), refs=1)
    elif case == "two_refs_offsets":  # two reference latents placed by offsets
        check_exact(pack, models["qwen"], cfg=3.0, latent_hw=(12, 20), refs=2, method="offset")
    elif case == "text_mask":  # padded prompt: masked text keys (the block loop's closure mask)
        check_exact(pack, models["qwen"], batch=2, cfg=3.0, latent_hw=(12, 20), masked=3, refs=1)
    elif case == "odd_size":  # a latent padded up to the patch (7 x 9 tokens, output cropped)
        check_exact(pack, models["qwen"], cfg=3.0, latent_hw=(13, 17), refs=1)
    else:
        check_exact(pack, models["qwen"], cfg=3.0, sampler="heun", split=True, refs=1)


def test_keep_ratio_one_is_exact_in_bfloat16(pack):
    """Qwen-Image's own inference dtype: the mask, RoPE rows and caches in bf16."""
    model = cq.load_qwen(cq.tiny_qwen_state_dict(seed=53, edit_2511=True), dtype=torch.bfloat16)
    assert model.model.diffusion_model.img_in.weight.dtype == torch.bfloat16
    check_exact(pack, model, batch=2, cfg=3.0, latent_hw=(12, 20), refs=1, masked=2)


def test_variants_change_the_image(models):
    """Controls: the mask, the references and t = 0 modulation each reach the model."""
    base = run(models["qwen"], cfg=3.0, refs=1)
    assert (run(models["qwen"], cfg=3.0, refs=1, masked=3) - base).abs().max() > 1e-3
    assert (run(models["qwen"], cfg=3.0) - base).abs().max() > 1e-3
    sd = cq.tiny_qwen_state_dict(seed=52)
    assert (run(cq.load_qwen(sd), cfg=3.0, refs=1) - run(models["edit_2511"], cfg=3.0, refs=1)).abs().max() > 1e-3


def test_qwen_image_is_a_flow_model(models, comfy):
    import comfy.model_sampling

    for model in models.values():
        assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def test_describe(pack, models):
    qb = pack.cat_core.blocks.qwen
    info = qb.describe(models["qwen"].model.diffusion_model)
    assert (info.arch, info.patch, info.num_blocks) == ("qwen_image", 2, 2)
    with pytest.raises(TypeError):
        qb.describe(torch.nn.Linear(2, 2))
    assert pack.nodes.patch._adapter_for(models["qwen"].model.diffusion_model).name == "qwen_image"


# ---------------------------------------------------------------------------------------------
# any keep: a pruned call on the capture call's own input reproduces the capture output
# ---------------------------------------------------------------------------------------------
ANY_KEEP = {"qwen": ("qwen", {}), "edit": ("qwen", {"refs": 1}), "edit_2511": ("edit_2511", {"refs": 1}),
            "edit_mask": ("qwen", {"refs": 2, "masked": 3})}
BATCHES = {"one": (1, 1.0), "cfg_pair": (1, 4.0), "two_images": (2, 1.0)}


def capture_then_prune(pack, comfy, model, *, keep, refresh, batch, latent_hw, **cond_kw):
    """Two euler steps at one sigma (dt = 0): step 0 captures, step 1 prunes on the same input."""
    recorder = Outputs()
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "cat_tests_outputs", recorder)
    patched = pack.nodes.patch.apply_cat(recorded, settings(pack, keep_ratio=keep, warmup_steps=1, refresh_first_block=refresh))
    pos, neg = conds(batch[0], **cond_kw)
    latent = cq.empty_latent(batch[0], latent_hw)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    sigmas = torch.tensor([0.7, 0.7, 0.0])
    with torch.inference_mode():
        comfy.sample.sample_custom(patched, noise, batch[1], comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latent,
                                   disable_pbar=True, seed=5)
    return recorder.calls, stats_of(pack, patched)


@pytest.mark.parametrize("case,keep,refresh,batch,shape", list(itertools.product(ANY_KEEP, [0.3, 0.55], [True, False], BATCHES, SHAPES)))
def test_pruned_call_on_the_capture_input_reproduces_the_capture_output(pack, comfy, models, case, keep, refresh, batch, shape):
    """Exact caches make the pruned arithmetic exact: any subset-only indexing bug shows here."""
    latent_hw = SHAPES[shape]
    name, cond_kw = ANY_KEEP[case]
    calls, stats = capture_then_prune(pack, comfy, models[name], keep=keep, refresh=refresh, batch=BATCHES[batch],
                                      latent_hw=latent_hw, **cond_kw)
    assert stats.fallback_reason is None, stats.fallback_reason
    assert [c.mode for c in stats.calls] == ["capture", "pruned"]
    rows, tokens = (2 if batch != "one" else 1), (latent_hw[0] // 2) * (latent_hw[1] // 2)
    assert 0 < stats.calls[-1].tokens_computed == rows * round(keep * tokens) < rows * tokens
    (x0, capture), (x1, out) = calls
    assert torch.equal(x0, x1) and x0.shape == (rows, 16, 1, *latent_hw)
    fresh = stats.selection_masks[0][0]
    mask = fresh.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None, None].expand_as(capture)
    scale = capture.abs().max().item()
    diff = (out - capture).abs()
    assert diff[mask].max().item() <= RTOL * scale, "recomputed tokens differ"
    assert diff[~mask].max().item() <= RTOL * scale, "cached tokens differ"


# ---------------------------------------------------------------------------------------------
# reference tokens, CFG pairing, MACs, lean path, pruned runs
# ---------------------------------------------------------------------------------------------
def test_reference_tokens_are_never_pruned(pack, models, monkeypatch):
    seen, shapes = [], []
    call_indices = pack.cat_core.indices.CallIndices
    original = call_indices.computed

    def spy_computed(self, n_txt, n_main, n_ref=0):
        found = original(self, n_txt, n_main, n_ref)
        if not n_txt:  # the image stream [main | reference] (not the attention sequence)
            seen.append((n_main, n_ref, self.selection().count, found.index.clone()))
        return found

    ops = pack.nodes.patch.QWEN_OPS

    def spy_attention(q, k, v, heads, mask, opts):
        shapes.append((q.shape[2], k.shape[2]))
        return ops.attention(q, k, v, heads, mask, opts)

    monkeypatch.setattr(call_indices, "computed", spy_computed)
    spy_ops = dataclasses.replace(ops, attention=spy_attention)
    adapters = tuple(dataclasses.replace(a, host_ops=spy_ops) if a.name == "qwen_image" else a for a in pack.nodes.patch.ADAPTERS)
    monkeypatch.setattr(pack.nodes.patch, "ADAPTERS", adapters)
    patched = pack.nodes.patch.apply_cat(models["edit_2511"], settings(pack, keep_ratio=0.3))
    out = run(patched, batch=2, latent_hw=(12, 20), refs=2)
    assert torch.isfinite(out).all()
    stats = stats_of(pack, patched)
    assert stats.fallback_reason is None
    n_main, n_ref, k = 6 * 10, 2 * 5 * 7, round(0.3 * 60)
    n_pruned = sum(c.mode == "pruned" for c in stats.calls)
    assert n_pruned == STEPS - WARMUP and len(seen) == 2 * n_pruned  # two blocks per pruned call
    for main, ref, sel, idx in seen:
        assert (main, ref, sel) == (n_main, n_ref, k) and idx.shape == (2, k + n_ref)
        assert torch.equal(idx[:, k:], torch.arange(n_main, n_main + n_ref).expand(2, -1))  # every reference token
        assert (idx[:, :k] < n_main).all()  # the pruned part is main-image tokens only
    full = TXT + n_main + n_ref
    assert shapes.count((full, full)) == 2  # the capture call's two blocks
    assert shapes.count((TXT + k + n_ref, full)) == 2 * n_pruned and len(shapes) == 2 * (1 + n_pruned)
    assert stats.ledger.computed["reference_tokens"] == stats.ledger.dense["reference_tokens"] > 0


def test_cfg_halves_share_a_selection_and_images_have_their_own(pack, models):
    """Rows are [uncond images, cond images]: with pair_cfg the two halves of an image share its
    selection, different images get their own; without pairing every row selects by itself."""
    def masks(pair):
        patched = pack.nodes.patch.apply_cat(models["qwen"], settings(pack, keep_ratio=0.3, pair_cfg=pair))
        run(patched, batch=2, latent_hw=(12, 20), cfg=4.0, refs=1, steps=8)
        stats = stats_of(pack, patched)
        assert stats.fallback_reason is None and stats.calls[-1].rows == 4
        return stats.selection_masks[0]  # [calls, rows, h, w]

    paired = masks(True)
    assert paired.shape[:2] == (8 - WARMUP, 4)
    assert torch.equal(paired[:, 0], paired[:, 2]) and torch.equal(paired[:, 1], paired[:, 3])
    assert all(not torch.equal(call[0], call[1]) for call in paired)
    unpaired = masks(False)
    assert not (torch.equal(unpaired[:, 0], unpaired[:, 2]) and torch.equal(unpaired[:, 1], unpaired[:, 3]))


@pytest.mark.parametrize("name,refresh,cond_kw", [("qwen", False, {}), ("qwen", True, {"refs": 1, "masked": 2}),
                                                  ("edit_2511", False, {"refs": 2})])
def test_mac_ledger_matches_flop_counter(pack, models, comfy, name, refresh, cond_kw):
    kw = dict(batch=2, latent_hw=(12, 20), cfg=3.0, **cond_kw)
    plain, dense_counter = ce.with_flops(models[name])
    run(plain, **kw)
    patched, counter = ce.with_flops(pack.nodes.patch.apply_cat(models[name], settings(pack, keep_ratio=0.3, refresh_first_block=refresh)))
    run(patched, **kw)
    stats = stats_of(pack, patched)
    assert stats.fallback_reason is None
    assert stats.ledger.total_dense == sum(dense_counter.macs)
    assert stats.ledger.total_computed == sum(counter.macs)
    assert sum(counter.macs) < 0.9 * sum(dense_counter.macs)


@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_lean_blocks_give_the_module_result_bit_for_bit(pack, models, keep):
    outs = {}
    for math in ("lean", "modules"):
        patched = pack.nodes.patch.apply_cat(models["edit_2511"], settings(pack, keep_ratio=keep, block_math=math))
        outs[math] = run(patched, batch=2, latent_hw=(12, 20), cfg=3.0, refs=1, masked=2)
        stats = stats_of(pack, patched)
        assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
        lean_blocks = 2 if math == "lean" else 0
        assert stats.block_math == {"setting": math, "lean_blocks": lean_blocks, "blocks": 2, "module_layers": {}}
    assert torch.equal(outs["lean"], outs["modules"])


@pytest.mark.parametrize("name,cond_kw", [("qwen", {}), ("edit_2511", {"refs": 1, "masked": 2})])
def test_pruned_run_completes_and_saves_macs(pack, models, name, cond_kw):
    steps, warmup, keep = 8, 3, 0.3
    kw = dict(cfg=3.0, steps=steps, latent_hw=(12, 20), **cond_kw)
    reference = run(models[name], **kw)
    patched = pack.nodes.patch.apply_cat(models[name], settings(pack, keep_ratio=keep, warmup_steps=warmup))
    out = run(patched, **kw)
    assert torch.isfinite(out).all() and out.shape == reference.shape
    assert (out - reference).abs().max() > 1e-4, "keep 0.3 must change the image"
    stats = stats_of(pack, patched)
    assert stats.fallback_reason is None and not stats.notes
    assert [c.mode for c in stats.calls] == ["dense"] * (warmup - 1) + ["capture"] + ["pruned"] * (steps - warmup)
    n, k = 60, round(keep * 60)
    assert [c.tokens_computed for c in stats.calls] == [2 * n] * warmup + [2 * k] * (steps - warmup)
    assert stats.ledger.saved_fraction() > 0.2
    assert stats.peak_cache_bytes > 0


# ---------------------------------------------------------------------------------------------
# what runs unpruned
# ---------------------------------------------------------------------------------------------
def test_unreadable_block_inputs_fall_back_to_exact_unpatched(pack, models, monkeypatch):
    """A ComfyUI whose block call does not carry the mask / timestep_zero_index where we read it."""
    ops = dataclasses.replace(pack.nodes.patch.QWEN_OPS, block_inputs=lambda original_block: None)
    adapters = tuple(dataclasses.replace(a, host_ops=ops) if a.name == "qwen_image" else a for a in pack.nodes.patch.ADAPTERS)
    monkeypatch.setattr(pack.nodes.patch, "ADAPTERS", adapters)
    reference = run(models["qwen"], cfg=3.0, refs=1, masked=2)
    patched = pack.nodes.patch.apply_cat(models["qwen"], settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, cfg=3.0, refs=1, masked=2), reference)
    assert "cannot read the text attention mask" in stats_of(pack, patched).fallback_reason


def test_block_inputs_are_read_from_comfys_block_call(pack, models, monkeypatch):
    """The host op finds the loop's own mask and index (2511 with a mask: both set)."""
    found = []
    qwen_blocks = pack.cat_core.blocks.qwen
    original = qwen_blocks._inputs

    def spy(block, args, extra, ops, n_main, n_ref):
        out = original(block, args, extra, ops, n_main, n_ref)
        found.append((out, n_main))
        return out

    monkeypatch.setattr(qwen_blocks, "_inputs", spy)
    patched = pack.nodes.patch.apply_cat(models["edit_2511"], settings(pack, keep_ratio=0.3))
    run(patched, cfg=3.0, refs=1, masked=2, latent_hw=(12, 20))
    assert found
    for (mask, tzi), n_main in found:
        assert tzi == n_main == 60
        assert mask.shape == (2, TXT) and (mask[:, -2:] < -1e30).all() and (mask[:, :-2] == 0).all()


def test_attention_patches_fall_back_to_exact_unpatched(pack, models):
    calls = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        calls.append(q.shape)
        return {}

    model = models["qwen"].clone()
    model.set_model_attn1_patch(attn1_patch)
    reference = run(model, cfg=3.0, refs=1)
    patched = pack.nodes.patch.apply_cat(model, settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, cfg=3.0, refs=1), reference)
    assert "attn1_patch" in stats_of(pack, patched).fallback_reason
    assert calls


def test_several_frames_run_unpruned_with_a_note(pack, models):
    """A [B, C, T > 1, H, W] latent has no 2-D token grid here: the model's own blocks, a note."""
    reference = run(models["qwen"], frames=2, latent_hw=(8, 8))
    patched = pack.nodes.patch.apply_cat(models["qwen"], settings(pack, keep_ratio=0.3))
    assert torch.equal(run(patched, frames=2, latent_hw=(8, 8)), reference)
    stats = stats_of(pack, patched)
    assert stats.calls == [] and "2 frames" in stats.notes[0] and stats.fallback_reason == stats.notes[0]
