"""The automatic schedule and step reuse through ComfyUI's real sampler loop (host tier).

Pins what the README's settings table says: the automatic warm-up for 4/8/20/28/50 steps, runs too
short to prune left exactly unpatched, workflow values saved before 0.4.0 behaving as before,
and step reuse with each sampler family (token pruning, or reuse only where CAT does not prune
tokens).
"""
from __future__ import annotations

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def model(comfy):
    return ce.tiny_sd3("sd3", seed=71)


def _sample(model, steps, sampler="euler"):
    return ce.sample(model, seed=5, steps=steps, cfg=4.0, sampler_name=sampler, scheduler="simple",
                     positive=ce.random_sd3_cond(1), negative=ce.random_sd3_cond(2), latent_hw=(8, 8))


def _patched_run(pack, model, steps, sampler="euler", **settings):
    patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(**settings))
    out = _sample(patched, steps, sampler)
    return out, pack.nodes.patch.holder_of(patched).last_stats


def _steps_in_mode(stats, mode):
    return sorted({c.step for c in stats.calls if c.mode == mode})


@pytest.mark.parametrize("steps", [4, 8])
def test_automatic_schedule_leaves_few_step_runs_exactly_unpatched(pack, model, steps):
    out, stats = _patched_run(pack, model, steps)
    assert torch.equal(out, _sample(model, steps))
    assert {c.mode for c in stats.calls} == {"dense"} and stats.ledger.saved_fraction() == 0.0
    assert stats.notes and "automatic schedule" in stats.notes[0] and str(steps) in stats.notes[0]
    assert stats.notes[0] in pack.cat_core.report.format_report(stats)


@pytest.mark.parametrize("steps,warmup", [(20, 6), (28, 8), (50, 8)])
def test_automatic_warmup_follows_the_step_count(pack, model, steps, warmup):
    out, stats = _patched_run(pack, model, steps)
    assert _steps_in_mode(stats, "capture") == [warmup - 1]
    assert _steps_in_mode(stats, "pruned") == list(range(warmup, steps - 1))  # one cool-down step
    assert stats.warmup_used == warmup and f"{warmup} steps (automatic)" in pack.cat_core.report.format_report(stats)
    assert torch.isfinite(out).all()


def test_automatic_and_fixed_warmup_agree_where_they_coincide(pack, model):
    auto, _ = _patched_run(pack, model, 28)
    fixed, _ = _patched_run(pack, model, 28, warmup_steps=8)
    assert torch.equal(auto, fixed)


def test_values_saved_before_the_automatic_schedule_behave_as_before(pack, model):
    """A 0.3 workflow's settings node: warmup 8, cooldown 1, no reuse_threshold widget."""
    node = pack.nodes.extension.CATPruningSettings
    saved = dict(keep_ratio=0.3, warmup_steps=8, num_clusters=20, stale_share=0.75, cluster_iters=10, feature_scale=0.05,
                 seed=0, pair_cfg=True, refresh_first_block=True, cooldown_steps=1, prune_any_sampler=False)
    settings = node.execute(**saved).args[0]
    assert settings.reuse_threshold == 0 and settings.warmup_steps == 8
    patched = pack.nodes.patch.apply_cat(model, settings)
    _sample(patched, 12)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert _steps_in_mode(stats, "capture") == [7] and _steps_in_mode(stats, "pruned") == [8, 9, 10]
    assert not stats.notes


def test_step_reuse_skips_calls_and_replaces_token_pruning(pack, model):
    out, stats = _patched_run(pack, model, 28, reuse_threshold=0.5)
    modes = [c.mode for c in stats.calls]
    assert "reuse" in modes and set(modes) == {"dense", "reuse"}
    assert all(c.step >= 5 and c.step < 27 for c in stats.calls if c.mode == "reuse")  # automatic reuse warm-up: 5 of 28
    assert stats.ledger.saved_fraction() > 0.2
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "uni_pc"])
def test_samplers_cat_does_not_prune_tokens_with_get_step_reuse_only(pack, model, sampler):
    """With reuse on, such samplers skip whole calls (x0 cache) but never prune tokens; without it,
    they stay exactly unpatched."""
    out, stats = _patched_run(pack, model, 28, sampler, reuse_threshold=0.5)
    modes = {c.mode for c in stats.calls}
    assert "pruned" not in modes and "capture" not in modes and "reuse" in modes, modes
    assert any("step reuse only" in n for n in stats.notes)
    assert torch.isfinite(out).all()
    off, off_stats = _patched_run(pack, model, 28, sampler)
    assert {c.mode for c in off_stats.calls} == {"dense"}
    assert torch.equal(off, _sample(model, 28, sampler))


def test_keep_one_with_reuse_is_reuse_only_and_the_computed_calls_are_the_models_own(pack, model, monkeypatch):
    """keep 1.0 + reuse: no CAT block math runs at all, so the computed calls equal the unpatched model's."""
    calls = []
    blocks = pack.cat_core.blocks.mmdit
    original = blocks.pruned_joint_block
    monkeypatch.setattr(blocks, "pruned_joint_block", lambda *a, **k: calls.append(1) or original(*a, **k))
    out, stats = _patched_run(pack, model, 28, keep_ratio=1.0, reuse_threshold=0.5)
    assert not calls and "reuse" in {c.mode for c in stats.calls}
    assert {c.mode for c in stats.calls} == {"dense", "reuse"}


@pytest.mark.parametrize("steps,reuses", [(4, False), (12, True)])
def test_step_reuse_only_also_serves_shorter_runs(pack, model, steps, reuses):
    out, stats = _patched_run(pack, model, steps, keep_ratio=1.0, reuse_threshold=0.9)
    assert ("reuse" in {c.mode for c in stats.calls}) == reuses
    if not reuses:
        assert torch.equal(out, _sample(model, steps)) and "automatic schedule" in stats.notes[0]
