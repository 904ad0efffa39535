"""Step reuse (reuse_threshold): whole model calls taken from the cache when the output is
predicted to stay put, through the same model-call protocol the ComfyUI wrapper uses."""
from __future__ import annotations

import pytest
import torch

from cat_core import CATSettings
from cat_core.blocks import mmdit as mmdit_blocks
from cat_core.model_call import model_call
from cat_core.runtime import PruningRun
from tests import cat_harness

SHAPE = (1, 16, 8, 8)


def _run(**settings):
    values = dict(keep_ratio=1.0, warmup_steps=1, cooldown_steps=0, cache_space="denoised", reuse_threshold=0.1)
    values.update(settings)
    return PruningRun(CATSettings(**values), mmdit_blocks.describe(cat_harness.tiny_model("sd3")))


class Model:
    """Returns a constant denoised prediction per call and counts the calls that ran."""

    def __init__(self):
        self.ran = 0

    def __call__(self, value):
        def run_model(ctx, hooks):
            self.ran += 1
            return torch.full(SHAPE, float(value))
        return run_model


def _call(run, model, x_value, denoised_value, sigma=0.5):
    x = torch.full(SHAPE, float(x_value))
    out = model_call(run, x, torch.full((1,), sigma), ("c",), None, model(denoised_value))
    run.on_step_end(run.step)
    return out


def test_calls_predicted_to_stay_put_are_reused_up_to_the_limit():
    run, model = _run(), Model()
    _call(run, model, 0.0, 1.0)  # capture
    _call(run, model, 1.0, 1.5)  # input moved 1, output 0.5: rate 0.5, output size 1.5
    reused = [_call(run, model, x, 9.0) for x in (1.1, 1.2, 1.25)]  # predicted 0.033, 0.067, 0.083 < 0.1
    assert model.ran == 3  # the third one is computed: at most two reuses in a row
    assert torch.equal(reused[0], torch.full(SHAPE, 1.5)) and torch.equal(reused[1], torch.full(SHAPE, 1.5))
    assert torch.equal(reused[2], torch.full(SHAPE, 9.0))
    _call(run, model, 3.0, 9.5)  # a large move of the input: computed
    stats = run.finish()
    # keep 1.0: no token pruning at all, the computed calls are the model's own (dense)
    assert [c.mode for c in stats.calls] == ["dense", "dense", "reuse", "reuse", "dense", "dense"]
    assert [c.tokens_computed for c in stats.calls][2:4] == [0, 0]


def test_step_reuse_replaces_token_pruning_at_any_keep_ratio():
    """The two compound (a skipped token also misses the reused calls): never both at once."""
    run, model = _run(keep_ratio=0.5), Model()
    for x, d in ((0.0, 1.0), (1.0, 1.5), (1.1, 9.0)):
        _call(run, model, x, d)
    stats = run.finish()
    assert [c.mode for c in stats.calls] == ["dense", "dense", "reuse"]
    from cat_core.report import format_report
    assert "keep_ratio is not used" in format_report(stats)


def test_a_sampler_cat_does_not_prune_gets_step_reuse_only_in_x0_space():
    run, model = _run(keep_ratio=0.3, cache_space="auto"), Model()
    run.use_sampler("euler_ancestral", None, "injects fresh noise")
    assert run.reuse_only and run.cache_space == "denoised"
    for x, d in ((0.0, 1.0), (1.0, 1.5), (1.1, 9.0)):
        _call(run, model, x, d)
    stats = run.finish()
    assert [c.mode for c in stats.calls] == ["dense", "dense", "reuse"]
    assert any("step reuse only" in note for note in stats.notes)


def test_without_reuse_such_a_sampler_stays_unpruned():
    run, model = _run(keep_ratio=0.3, reuse_threshold=0.0), Model()
    run.use_sampler("euler_ancestral", None, "injects fresh noise")
    for x in (0.0, 1.0, 1.0):
        _call(run, model, x, 1.0)
    assert [c.mode for c in run.finish().calls] == ["dense"] * 3


@pytest.mark.parametrize("unsupported", [None, "injects fresh noise"], ids=["token-supported", "token-unsupported"])
def test_the_sampler_table_can_choose_step_reuse_instead(unsupported):
    """reuse_instead: with no threshold of the user's, the run reuses steps at the table's threshold
    in x0 space, says so, and reports the threshold it used."""
    run, model = _run(keep_ratio=0.3, reuse_threshold=0.0, cache_space="auto"), Model()
    run.use_sampler("dpmpp_2m", "denoised" if unsupported is None else None, unsupported, 0.1)
    assert run.reuse_only and run.reuse_threshold == 0.1 and run.cache_space == "denoised"
    for x, d in ((0.0, 1.0), (1.0, 1.5), (1.1, 9.0)):
        _call(run, model, x, d)
    stats = run.finish()
    assert [c.mode for c in stats.calls] == ["dense", "dense", "reuse"] and stats.reuse_used == 0.1
    assert len(stats.notes) == 1 and "step reuse 0.1 instead" in stats.notes[0]
    from cat_core.report import format_report
    assert "Step reuse 0.1:" in format_report(stats)


def test_the_users_threshold_and_prune_any_sampler_win_over_the_table():
    own = _run(keep_ratio=0.3, reuse_threshold=0.2, cache_space="auto")
    own.use_sampler("dpmpp_2m", "denoised", None, 0.1)
    assert own.reuse_threshold == 0.2 and not own.finish().notes
    forced = _run(keep_ratio=0.3, reuse_threshold=0.0, cache_space="auto", prune_any_sampler=True)
    forced.use_sampler("euler_ancestral", None, "injects fresh noise", 0.1)
    assert not forced.reuse_only and forced.reuse_threshold == 0.0 and not forced.finish().notes
    exact = _run(keep_ratio=1.0, reuse_threshold=0.0, cache_space="auto")  # keep 1.0: the exact image
    exact.use_sampler("dpmpp_2m", "denoised", None, 0.1)
    assert not exact.reuse_only and not exact.finish().notes


def test_a_large_predicted_change_is_computed():
    run, model = _run(), Model()
    _call(run, model, 0.0, 1.0)
    _call(run, model, 1.0, 2.0)  # rate 1, output size 2
    _call(run, model, 1.3, 2.0)  # predicted 0.15 > 0.1
    assert model.ran == 3


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_no_reuse_before_pruning_starts_or_when_off(threshold):
    run, model = _run(warmup_steps=4, reuse_threshold=threshold), Model()
    for i in range(6):
        _call(run, model, 1.0 + 1e-6 * i, 1.0)  # nothing moves at all
    modes = [c.mode for c in run.finish().calls]
    assert modes[:3] == ["dense"] * 3
    assert ("reuse" in modes) == (threshold > 0)


def test_max_reuses_in_row_is_respected():
    run, model = _run(max_reuses_in_row=1), Model()
    for i in range(8):
        _call(run, model, 1.0 + 0.001 * i, 1.0)
    modes = [c.mode for c in run.finish().calls]
    assert "reuse" in modes and "reuse,reuse" not in ",".join(modes)


def test_a_reused_velocity_is_applied_at_the_new_input_and_sigma():
    run, model = _run(cache_space="velocity"), Model()
    _call(run, model, 0.0, -1.0, sigma=0.8)  # v = (0 - -1) / 0.8 = 1.25
    _call(run, model, 0.1, -0.9, sigma=0.7)  # v = 1.0 / 0.7
    out = _call(run, model, 0.11, 5.0, sigma=0.6)
    assert model.ran == 2
    torch.testing.assert_close(out, torch.full(SHAPE, 0.11 - 0.6 * (1.0 / 0.7)))


def test_a_reused_call_saves_all_of_its_macs():
    run, model = _run(), Model()
    for x in (0.0, 1.0, 1.05):
        _call(run, model, x, 1.0 + x / 2)
    stats = run.finish()
    assert [c.mode for c in stats.calls] == ["dense", "dense", "reuse"]
    outer = run.info.outer_macs(1, 0, 16)
    assert stats.ledger.dense["embed_and_final"] == 3 * outer
    assert stats.ledger.computed["embed_and_final"] == 2 * outer


def test_reuse_on_the_harness_sampler_stays_finite_and_skips_calls():
    """Through real blocks (the host-free MMDiT): a run with reuse skips model calls, runs the
    others as the model's own, and the image stays finite."""
    model = cat_harness.tiny_model("sd3", seed=3)
    cond, uncond = cat_harness.random_cond(1, 1), cat_harness.random_cond(1, 2)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = CATSettings(keep_ratio=0.5, warmup_steps=3, cooldown_steps=1, reuse_threshold=0.5)
    out, stats = cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=12, settings=settings)
    modes = [c.mode for c in stats.calls]
    assert "reuse" in modes and "pruned" not in modes and torch.isfinite(out).all()
    assert stats.ledger.saved_fraction() > 0


def test_step_reuse_caches_the_x0_prediction_unless_told_otherwise():
    run = _run(cache_space="auto")
    run.use_sampler("euler", "velocity")  # the sampler table's choice for token pruning
    assert run.cache_space == "denoised"
    explicit = _run(cache_space="velocity")
    explicit.use_sampler("euler", "velocity")
    assert explicit.cache_space == "velocity"
    assert _run(cache_space="auto", reuse_threshold=0.0).cache_space == "velocity"
