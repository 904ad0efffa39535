"""State and memory across runs: what a CAT-patched model keeps between sampler runs.

ComfyUI caches node outputs, so one patched MODEL object serves every later prompt (other sizes,
batches, step counts, samplers), runs get interrupted, and users queue dozens of prompts. The pack
keeps its per-run state in one PruningRun per sampler run; these tests check from the outside that
nothing of a run survives it except the CPU stats, and that nothing leaks into the next run.
"""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

RUN_STATE_TYPES = ("PruningRun", "LayoutState", "BlockCache", "CallContext")




@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=41) for layout in ce.SD3_LAYOUTS}


def settings(pack, keep=0.3, warmup=2, **kw):
    return pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=warmup, **kw)


def stats_of(pack, model):
    return pack.nodes.patch.holder_of(model).last_stats


def run(model, *, batch=1, latent_hw=(16, 16), steps=6, cfg=4.0, sampler="euler", split=False, denoise=1.0,
        callback=None, seed=5):
    latent = None
    if denoise < 1.0:
        latent = torch.randn(batch, 16, *latent_hw, generator=torch.Generator().manual_seed(seed + 100))
    return ce.sample(model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                     positive=ce.random_sd3_cond(1, batch), negative=ce.random_sd3_cond(2, batch), batch=batch,
                     latent_hw=latent_hw, denoise=denoise, latent_image=latent, force_split_cfg=split,
                     callback=callback)


def run_state_objects() -> dict[str, int]:
    """Live objects of the pack's per-run classes (by type name: the pack is imported under a
    synthetic package name, and ComfyUI may load it under another)."""
    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in RUN_STATE_TYPES and type(obj).__module__.endswith(("cat_core.runtime",)):
            counts[name] = counts.get(name, 0) + 1
    return counts


def live_tensor_bytes() -> tuple[int, int]:
    """(bytes, count) of every live torch tensor the garbage collector tracks."""
    gc.collect()
    total = count = 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            try:
                total += obj.numel() * obj.element_size()
            except RuntimeError:  # e.g. a tensor without storage
                continue
            count += 1
    return total, count


VARIANTS = [
    dict(batch=1, latent_hw=(16, 16), steps=6),
    dict(batch=3, latent_hw=(10, 14), steps=8, sampler="heun"),
    dict(batch=2, latent_hw=(9, 13), steps=5, split=True),
    dict(batch=1, latent_hw=(20, 12), steps=10, cfg=1.0, sampler="dpmpp_2m"),
    dict(batch=2, latent_hw=(16, 16), steps=7, denoise=0.6, sampler="euler_ancestral"),
    dict(batch=1, latent_hw=(16, 16), steps=6),  # the first one again, after all the others
]


@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
def test_reused_patched_model_equals_fresh_models(pack, models, layout):
    model = models[layout]
    shared = pack.nodes.patch.apply_cat(model, settings(pack))
    reused, reused_stats = [], []
    for kw in VARIANTS:
        reused.append(run(shared, **kw))
        reused_stats.append(stats_of(pack, shared))
        run(model, **kw)  # the unpatched model runs in between (same nn.Module underneath)
    for kw, out, stats in zip(VARIANTS, reused, reused_stats):
        fresh = pack.nodes.patch.apply_cat(model, settings(pack))
        assert torch.equal(out, run(fresh, **kw)), kw
        fresh_stats = stats_of(pack, fresh)
        assert [(c.step, c.mode, c.rows, c.tokens_computed) for c in stats.calls] == \
               [(c.step, c.mode, c.rows, c.tokens_computed) for c in fresh_stats.calls], kw
    assert torch.equal(reused[0], reused[-1])


def test_two_patched_clones_alternating_do_not_share_state(pack, models):
    """Two CAT patches of one model (different settings), run alternately, equal each run alone."""
    model = models["sd35_medium"]
    a = pack.nodes.patch.apply_cat(model, settings(pack, keep=0.3))
    b = pack.nodes.patch.apply_cat(model, settings(pack, keep=0.5, num_clusters=3))
    alternating = [run(a), run(b, batch=2), run(a, latent_hw=(12, 12)), run(b, batch=2)]
    alone = [run(pack.nodes.patch.apply_cat(model, settings(pack, keep=0.3))),
             run(pack.nodes.patch.apply_cat(model, settings(pack, keep=0.5, num_clusters=3)), batch=2),
             run(pack.nodes.patch.apply_cat(model, settings(pack, keep=0.3)), latent_hw=(12, 12))]
    assert torch.equal(alternating[0], alone[0])
    assert torch.equal(alternating[1], alone[1]) and torch.equal(alternating[3], alone[1])
    assert torch.equal(alternating[2], alone[2])


# --------------------------------------------------------------------------------------------
# interruption
# --------------------------------------------------------------------------------------------
def interrupt_at(step):
    import comfy.model_management

    def callback(i, denoised, x, total_steps):
        if i == step:  # what ComfyUI's progress hook does when the user presses Cancel
            raise comfy.model_management.InterruptProcessingException()
    return callback


@pytest.mark.parametrize("kw", [dict(), dict(sampler="heun", batch=2), dict(split=True, latent_hw=(12, 20))],
                         ids=["euler", "heun-batch2", "split"])
def test_interrupted_run_then_normal_run_equals_fresh(pack, models, kw):
    import comfy.model_management

    model = models["sd35_large"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(patched, steps=10, callback=interrupt_at(5), **kw)
    interrupted = stats_of(pack, patched)
    assert interrupted is not None and max(c.step for c in interrupted.calls) == 5  # the stopped run's own stats
    assert run_state_objects() == {}, "the interrupted run left its state behind"

    out = run(patched, steps=8, **kw)
    finished = stats_of(pack, patched)
    fresh = pack.nodes.patch.apply_cat(model, settings(pack))
    assert torch.equal(out, run(fresh, steps=8, **kw))
    # the stats now describe the finished 8-step run only
    assert finished is not interrupted
    assert sorted({c.step for c in finished.calls}) == list(range(8))
    assert [c.mode for c in finished.calls] == [c.mode for c in stats_of(pack, fresh).calls]
    assert finished.fallback_reason is None


def test_interrupt_inside_a_pruned_call_is_not_swallowed(pack, models, monkeypatch):
    """An interrupt raised inside the model during a pruned call must reach ComfyUI (not be turned
    into the dense fallback), and the next run is normal."""
    import comfy.model_management

    model = models["sd3"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack))
    original = pack.cat_core.blocks.mmdit.pruned_joint_block
    calls = {"n": 0}

    def interrupting(*args, **kwargs):  # (block, layout, block_index, args, ctx, attention)
        ctx = args[4] if len(args) > 4 else kwargs["ctx"]
        if ctx.mode.value == "pruned":
            calls["n"] += 1
            raise comfy.model_management.InterruptProcessingException()
        return original(*args, **kwargs)

    monkeypatch.setattr(pack.cat_core.blocks.mmdit, "pruned_joint_block", interrupting)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(patched)
    assert calls["n"] == 1
    assert stats_of(pack, patched).fallback_reason is None
    monkeypatch.setattr(pack.cat_core.blocks.mmdit, "pruned_joint_block", original)
    assert torch.equal(run(patched), run(pack.nodes.patch.apply_cat(model, settings(pack))))


def test_error_in_user_callback_propagates_and_next_run_is_clean(pack, models):
    model = models["sd3"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack))

    def broken(i, *args):
        if i == 3:
            raise KeyError("preview failed")

    with pytest.raises(KeyError, match="preview failed"):
        run(patched, callback=broken)
    assert run_state_objects() == {}
    assert torch.equal(run(patched), run(pack.nodes.patch.apply_cat(model, settings(pack))))


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def test_run_state_detection_sees_a_live_run(pack, models):
    """Guards the two leak tests below: while a run is going, its state objects are visible."""
    seen = {}

    def callback(i, *args):
        if i == 4:
            seen.update(run_state_objects())

    patched = pack.nodes.patch.apply_cat(models["sd3"], settings(pack))
    run(patched, callback=callback)
    assert seen.get("PruningRun") == 1 and seen.get("LayoutState", 0) >= 1 and seen.get("BlockCache", 0) >= 2
    assert run_state_objects() == {}


def test_twenty_runs_do_not_grow_memory(pack, models):
    model = models["sd35_medium"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack))
    last = dict(batch=2, latent_hw=(16, 16), steps=6)

    def config(i):
        return dict(batch=1 + i % 3, latent_hw=((16, 16), (12, 20), (9, 9))[i % 3], steps=4 + i % 5,
                    split=bool(i % 2), sampler=("euler", "heun", "dpmpp_2m")[i % 3])

    # one pass over the shapes first, so that whatever ComfyUI or torch allocate lazily per shape
    # exists before the measurement
    for i in range(6):
        run(patched, **config(i))
    run(patched, **last)
    before_bytes, before_count = live_tensor_bytes()
    peak_caches = []
    for i in range(20):
        run(patched, **config(i))
        peak_caches.append(stats_of(pack, patched).peak_cache_bytes)
        assert run_state_objects() == {}, f"run {i} ({config(i)}) left its state behind"
    run(patched, **last)  # the holder keeps the stats of its last run: end with the same run as before
    after_bytes, after_count = live_tensor_bytes()
    assert max(peak_caches) > 0  # the runs did use caches...
    # ...and none of them survives: the same live tensors as before the 20 runs
    assert (after_bytes, after_count) == (before_bytes, before_count), \
        f"live tensors grew by {after_bytes - before_bytes} bytes / {after_count - before_count} tensors"


def _tensors_in(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors_in(getattr(obj, f.name), seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_in(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] not in ("torch", "builtins"):
        yield from _tensors_in(vars(obj), seen)


def test_caches_released_and_stats_keep_only_cpu_maps(pack, models):
    model = models["sd35_medium"]
    patched = pack.nodes.patch.apply_cat(model, settings(pack))
    run(patched, batch=2, latent_hw=(16, 16), steps=8)
    stats = stats_of(pack, patched)
    tensors = list(_tensors_in(stats))
    assert tensors, "RunStats should keep its maps"
    assert all(t.device.type == "cpu" for t in tensors)
    kept = sum(t.numel() * t.element_size() for t in tensors)
    # K/V caches of 2 blocks (+ MMDiT-X attn2) for 4 rows x (16 text + 64 image) tokens x 128 channels
    assert stats.peak_cache_bytes >= 2 * 2 * 4 * (16 + 64) * 128 * 4
    assert kept < stats.peak_cache_bytes / 10, f"stats keep {kept} bytes (caches peaked at {stats.peak_cache_bytes})"
    # only token maps: no tensor as large as one block's key cache
    assert max(t.numel() for t in tensors) < 4 * (16 + 64) * 128
    assert run_state_objects() == {}


# --------------------------------------------------------------------------------------------
# lowvram / offloaded weights
# --------------------------------------------------------------------------------------------
def _tiny_lora(model):
    return ce.kohya_lora(model, ("joint_blocks_0_x_block_attn_qkv", "joint_blocks_1_x_block_mlp_fc1", "joint_blocks_0_context_block_mlp_fc2"))


@pytest.mark.parametrize("share", ["nothing_loaded", "half_loaded"])
def test_lowvram_partial_load_with_lora(pack, models, comfy, forced_lowvram, share):
    import comfy.sd

    mm = comfy.model_management
    base = models["sd35_medium"]
    with_lora, _ = comfy.sd.load_lora_for_models(base, None, _tiny_lora(base), 1.0, 0)
    forced_lowvram["bytes"] = 1 if share == "nothing_loaded" else with_lora.model_size() // 2

    def fresh_load_run(model):  # every run loads the weights anew under the budget
        mm.unload_all_models()
        out = run(model, batch=2)
        return out, model.model.model_lowvram, model.model.lowvram_patch_counter

    reference, lowvram, lowvram_patches = fresh_load_run(with_lora)
    assert lowvram, "ComfyUI did not load the model in lowvram mode"
    if share == "nothing_loaded":
        assert lowvram_patches > 0  # the LoRA is applied on the fly (LowVramPatch weight functions)
    out, lowvram, _ = fresh_load_run(pack.nodes.patch.apply_cat(with_lora, settings(pack, keep=1.0)))
    assert lowvram and torch.equal(out, reference)
    lowvram_pruned, lowvram, _ = fresh_load_run(pack.nodes.patch.apply_cat(with_lora, settings(pack)))
    assert lowvram and torch.isfinite(lowvram_pruned).all()

    forced_lowvram["bytes"] = 0  # back to a full load (ComfyUI's "use all memory")
    full_pruned, lowvram, _ = fresh_load_run(pack.nodes.patch.apply_cat(with_lora, settings(pack)))
    assert not lowvram
    assert torch.equal(full_pruned, lowvram_pruned), "pruning differs between lowvram and full loads"
