"""The step plan: which sampler steps run in full, capture, or prune."""
from __future__ import annotations

import pytest

from cat_core import CATSettings
from cat_core.schedule import CallMode, StepPlan

D, C, P = CallMode.DENSE, CallMode.CAPTURE, CallMode.PRUNED


def plan_of(settings, steps):
    return StepPlan(settings.warmup_steps, settings.cooldown_steps, steps)


@pytest.mark.parametrize("steps", [4, 8, 20, 28, 50])
def test_default_plan(steps):
    modes = plan_of(CATSettings(), steps).modes()
    if steps <= 9:  # warm-up 8 + cool-down 1 leave no step to prune: no capture either
        assert modes == [D] * steps
    else:
        assert modes == [D] * 7 + [C] + [P] * (steps - 9) + [D]


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
