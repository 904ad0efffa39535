"""5-D latents [B, C, T, H, W] in the model-call protocol (Qwen-Image: T = 1)."""
from __future__ import annotations

import torch

from cat_core import CATSettings
from cat_core.model_call import model_call
from cat_core.runtime import ModelInfo, PruningRun

INFO = ModelInfo(arch="test", patch=2, num_blocks=0, outer_macs=lambda rows, txt, img: 0)
SHAPE = (2, 4, 6, 10)  # [B, C, H, W]: a 3 x 5 token grid


def _calls(frames: bool, steps: int = 5):
    """A run of model calls whose 'model' returns seeded outputs; returns (outputs, stats, seen contexts)."""
    run = PruningRun(CATSettings(warmup_steps=2, cooldown_steps=0, keep_ratio=0.4), INFO)
    gen = torch.Generator().manual_seed(0)
    outs, seen = [], []
    for step in range(steps):
        x = torch.randn(SHAPE, generator=gen)
        model_out = torch.randn(SHAPE, generator=gen)
        sigma = torch.full((SHAPE[0],), 1.0 - step / steps)
        if frames:
            x, model_out = x.unsqueeze(2), model_out.unsqueeze(2)

        def run_model(ctx, hooks, out=model_out):
            seen.append((None if ctx is None else ctx.mode.value, hooks, None if ctx is None else ctx.layout.latent_hw))
            return out

        run.begin_evaluation()
        outs.append(model_call(run, x, sigma, ("cond", "uncond"), (1, 8, 16), run_model))
        run.on_step_end(step)
    return outs, run.finish(), seen


def test_one_frame_latents_prune_exactly_as_the_same_images():
    """[B, C, 1, H, W] calls give bit for bit the outputs, selections and stats of the [B, C, H, W]
    calls, in the host's 5-D shape."""
    flat, flat_stats, flat_seen = _calls(False)
    framed, framed_stats, framed_seen = _calls(True)
    assert [c.mode for c in framed_stats.calls] == ["dense", "capture", "pruned", "pruned", "pruned"]
    assert framed_seen == flat_seen and framed_seen[-1] == ("pruned", True, SHAPE[2:])
    for a, b in zip(flat, framed):
        assert b.shape == a.unsqueeze(2).shape
        assert torch.equal(b.squeeze(2), a)
    assert [vars(c) for c in framed_stats.calls] == [vars(c) for c in flat_stats.calls]
    assert all(torch.equal(a, b) for a, b in zip(flat_stats.selection_masks, framed_stats.selection_masks))
    assert framed_stats.refresh_maps[0].shape == (SHAPE[0], 3, 5)


def test_pruned_one_frame_calls_merge_the_cached_tokens():
    """The merge happens on the 5-D calls too: reused tokens are not the model's raw output."""
    gen = torch.Generator().manual_seed(3)
    run = PruningRun(CATSettings(warmup_steps=1, cooldown_steps=0, keep_ratio=0.25), INFO)
    x = torch.randn(1, 4, 1, 8, 8, generator=gen)
    sigma = torch.full((1,), 0.5)
    first = torch.randn(x.shape, generator=gen)
    assert torch.equal(model_call(run, x, sigma, ("c",), None, lambda ctx, hooks: first), first)  # capture
    run.on_step_end(0)
    garbage = torch.full_like(first, 1e3)
    out = model_call(run, x, sigma, ("c",), None, lambda ctx, hooks: garbage)
    mask = run.finish().selection_masks[0][0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None, None].expand_as(out)
    assert out.shape == x.shape and 0 < mask.sum() < mask.numel()
    assert torch.equal(out[mask], garbage[mask])
    torch.testing.assert_close(out[~mask], first[~mask])


def test_several_frames_run_unpruned_with_a_note():
    run = PruningRun(CATSettings(warmup_steps=1, cooldown_steps=0), INFO)
    x = torch.randn(1, 4, 3, 8, 8)
    out = torch.randn(x.shape)
    seen = []

    def run_model(ctx, hooks):
        seen.append((ctx, hooks))
        return out

    for step in range(3):
        assert model_call(run, x, torch.ones(1), ("c",), None, run_model) is out
        run.on_step_end(step)
    assert seen == [(None, False)] * 3  # the model's own blocks, no CAT context
    stats = run.finish()
    assert stats.calls == [] and stats.notes == ["model calls on latents with 3 frames ran unpruned (one-frame latents only)"]
    assert stats.fallback_reason == stats.notes[0]
