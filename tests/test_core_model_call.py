"""The model-call protocol (cat_core/model_call.py) that ComfyUI's wrapper and the harness share."""
from __future__ import annotations

import pytest
import torch

from cat_core import CATSettings
from cat_core.blocks import mmdit as mmdit_blocks
from tests import cat_harness


def _run(settings=None, steps=6):
    model = cat_harness.tiny_model("sd3", seed=3)
    cond, uncond = cat_harness.random_cond(1, 1), cat_harness.random_cond(1, 2)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=steps, settings=settings)


def test_an_error_in_a_pruned_call_finishes_the_run_unpruned(monkeypatch):
    """The first pruned call fails: it and every later call are recomputed without CAT, so the
    image is the unpatched one bit for bit (the capture call before it is exact)."""
    reference, _ = _run()
    original = mmdit_blocks.pruned_joint_block

    def failing(block, layout, index, args, ctx, *rest):
        if ctx.mode.value == "pruned":
            raise RuntimeError("boom")
        return original(block, layout, index, args, ctx, *rest)

    monkeypatch.setattr(mmdit_blocks, "pruned_joint_block", failing)
    out, stats = _run(CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=0))
    assert stats.fallback_reason == "RuntimeError: boom"
    # the failed call is recomputed outside the run (not recorded); the three after it run dense
    assert [c.mode for c in stats.calls] == ["dense", "capture"] + ["dense"] * 3
    assert torch.equal(out, reference)


def test_the_hosts_interrupt_passes_through(monkeypatch):
    from cat_core.model_call import model_call
    from cat_core.runtime import PruningRun

    class Interrupted(Exception):
        pass

    run = PruningRun(CATSettings(warmup_steps=1), mmdit_blocks.describe(cat_harness.tiny_model("sd3")))
    x = torch.zeros(1, 16, 8, 8)

    def interrupted(ctx, hooks):
        raise Interrupted()

    with pytest.raises(Interrupted):  # a capture call: would otherwise fall back
        model_call(run, x, torch.ones(1), ("c",), None, interrupted, passthrough=(Interrupted,))
    assert run.stats.fallback_reason is None


@pytest.mark.parametrize("cache_space", ["velocity", "denoised"])
def test_reused_tokens_come_from_the_cache_in_its_space(cache_space):
    """A pruned call whose model returns garbage for the reused tokens: the merge replaces them
    by the cached quantity, the recomputed ones pass through."""
    from cat_core.model_call import model_call
    from cat_core.runtime import PruningRun

    run = PruningRun(CATSettings(warmup_steps=1, keep_ratio=0.25, cache_space=cache_space),
                     mmdit_blocks.describe(cat_harness.tiny_model("sd3")))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    first = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((1,), 0.5)
    assert torch.equal(model_call(run, x, sigma, ("c",), None, lambda ctx, hooks: first), first)  # capture
    run.on_step_end(0)
    garbage = torch.full_like(first, 1e3)
    out = model_call(run, x, sigma, ("c",), None, lambda ctx, hooks: garbage)
    stats = run.finish()
    mask = stats.selection_masks[0][0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None].expand_as(out)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(out[mask], garbage[mask])
    torch.testing.assert_close(out[~mask], first[~mask])  # velocity space: x - sigma * v of the same x
