"""The step plan: which sampler steps run in full, capture, or prune."""
from __future__ import annotations

import pytest

from cat_core import CATSettings
from cat_core import schedule
from cat_core.schedule import AUTO, CallMode, StepPlan

D, C, P = CallMode.DENSE, CallMode.CAPTURE, CallMode.PRUNED


def plan_of(settings, steps):
    return StepPlan.for_run(settings.warmup_steps, settings.cooldown_steps, steps)


@pytest.mark.parametrize("steps", [4, 8, 20, 28, 50])
def test_fixed_warmup_of_earlier_versions(steps):
    """warmup_steps 8, cooldown 1 (the 0.3 defaults, in every workflow saved before 0.4): unchanged."""
    modes = plan_of(CATSettings(warmup_steps=8, cooldown_steps=1), steps).modes()
    if steps <= 9:  # warm-up 8 + cool-down 1 leave no step to prune: no capture either
        assert modes == [D] * steps
    else:
        assert modes == [D] * 7 + [C] + [P] * (steps - 9) + [D]


def _expected_auto_warmup(steps, share=schedule.AUTO_WARMUP_SHARE):
    # written out from the rule in the docstring of StepPlan.for_run, not from its code
    return min(schedule.AUTO_MAX_WARMUP, max(2, round(share * steps)))


@pytest.mark.parametrize("steps", [4, 8, 19, 20, 28, 50])
def test_default_plan_is_automatic(steps):
    settings = CATSettings()
    assert settings.warmup_steps == AUTO
    plan = plan_of(settings, steps)
    modes = plan.modes()
    if steps < schedule.AUTO_MIN_STEPS:
        assert modes == [D] * steps and plan.unpruned_reason and str(steps) in plan.unpruned_reason
    else:
        w = _expected_auto_warmup(steps)
        assert plan.unpruned_reason is None
        assert modes == [D] * (w - 1) + [C] + [P] * (steps - w - 1) + [D]


def test_automatic_warmup_values():
    """The values the README's settings table quotes."""
    assert [plan_of(CATSettings(), n).warmup_steps for n in (20, 28, 50)] == [6, 8, 8]
    assert [StepPlan.for_run(AUTO, 1, n, token_pruning=False).warmup_steps for n in (8, 12, 20, 28, 50)] == [2, 2, 4, 5, 8]
    assert plan_of(CATSettings(), 19).modes() == [D] * 19


def test_automatic_warmup_without_a_step_count():
    plan = StepPlan.for_run(AUTO, 1)
    assert plan.warmup_steps == schedule.AUTO_UNKNOWN_WARMUP and plan.full_from() is None


@pytest.mark.parametrize("warmup,cooldown,steps", [(1, 0, 5), (3, 2, 10), (5, 5, 10), (2, 1, 3)])
def test_plan_shape(warmup, cooldown, steps):
    modes = StepPlan(warmup, cooldown, steps).modes()
    pruned = max(0, steps - cooldown - warmup)
    if pruned == 0:
        assert modes == [D] * steps
    else:
        assert modes == [D] * (warmup - 1) + [C] + [P] * pruned + [D] * cooldown


def test_unknown_step_count_has_no_cooldown():
    plan = StepPlan(3, 2)
    assert [plan.mode(s) for s in range(6)] == [D, D, C, P, P, P] and plan.full_from() is None


@pytest.mark.parametrize("steps", [4, 7, 8, 12, 19])
def test_step_reuse_only_runs_prune_from_a_shorter_run_on(steps):
    plan = StepPlan.for_run(AUTO, 1, steps, token_pruning=False)
    if steps < schedule.AUTO_MIN_REUSE_STEPS:
        assert plan.modes() == [D] * steps and plan.unpruned_reason
    else:
        assert plan.unpruned_reason is None and plan.warmup_steps == _expected_auto_warmup(steps, schedule.AUTO_REUSE_WARMUP_SHARE)
        assert P in plan.modes()
    assert StepPlan.for_run(8, 1, steps, token_pruning=False) == StepPlan(8, 1, steps)  # fixed warm-ups as set
