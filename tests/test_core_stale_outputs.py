"""cat_core.stale_outputs and the runtime serving it: a token that is not recomputed gets its
cached output carried on along the change it showed between its last two computations."""
from __future__ import annotations

import pytest
import torch

from cat_core import CallMode, CATSettings, PruningRun, SettingsError
from cat_core.stale_outputs import extrapolated, update_change
from cat_core.tokens import token_grid
from tests.test_core_runtime import _info


def test_extrapolated_by_hand():
    cached = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    change = torch.tensor([[[[0.5, -1.0, 2.0]]]])
    assert extrapolated(cached, change, 0.5).flatten().tolist() == pytest.approx([1.25, 1.5, 4.0])
    assert torch.equal(extrapolated(cached, change, 0.0), cached)


def test_update_change_measures_the_recomputed_tokens_per_call_and_keeps_the_others():
    change = torch.full((1, 2, 1, 3), 7.0)
    cached = torch.tensor([[[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]])
    computed = torch.tensor([[[[4.0, 9.0, 2.0]], [[3.0, -6.0, 1.0]]]])
    fresh = torch.tensor([[[[True, False, True]]]])
    waited = torch.tensor([[[[3.0, 5.0, 1.0]]]])
    update_change(change, fresh, computed, cached, waited)
    assert change[0, 0, 0].tolist() == pytest.approx([1.0, 7.0, 1.0])
    assert change[0, 1, 0].tolist() == pytest.approx([1.0, 7.0, 1.0])


def _pixel_token(y, x, wp):
    return (y // 2) * wp + x // 2


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_pruned_calls_serve_stale_tokens_their_output_carried_on(strength):
    """Dense A, capture B, then pruned calls: a token not recomputed since the capture is served
    B + s * (B - A), however long it waits; one recomputed after waiting w calls, its new output
    C plus s * (C - its output before) / w. The cache itself keeps the computed outputs only."""
    run = PruningRun(CATSettings(warmup_steps=2, keep_ratio=0.25, num_clusters=4, extrapolation=strength), _info())
    shape = (2, 4, 7, 9)  # grid 4 x 5 = 20 tokens, budget 5
    _, wp = token_grid(7, 9, 2)
    g = torch.Generator().manual_seed(5)
    outputs, served, chosen = [], [], []
    for step in range(5):
        ctx = run.begin_call(shape, ("c",), "cpu")
        assert ctx.mode is [CallMode.DENSE, CallMode.CAPTURE, CallMode.PRUNED, CallMode.PRUNED, CallMode.PRUNED][step]
        chosen.append(None if ctx.index is None else [set(row.tolist()) for row in ctx.index])
        outputs.append(torch.randn(*shape, generator=g))
        merged, _ = run.end_call(ctx, outputs[-1].clone())
        served.append(merged.clone())
        run.on_step_end(step)
    a, b = outputs[0], outputs[1]
    waited_long = 0
    for row in range(2):
        for y in range(7):
            for x in range(9):
                token = _pixel_token(y, x, wp)
                last, change, waited = b, b - a, 0  # latest computed output, its change per call, calls since
                for call in (2, 3, 4):
                    waited += 1
                    if token in chosen[call][row]:
                        want = outputs[call]
                        last, change, waited = outputs[call], (outputs[call] - last) / waited, 0
                    else:
                        want = last + strength * change
                        waited_long += waited > 1
                    assert torch.allclose(served[call][row, :, y, x], want[row, :, y, x], atol=1e-5), (call, row, y, x)
    assert waited_long > 0  # some token waited more than one call: served one call ahead all the same
    # some token was recomputed after waiting two calls or more: its change was divided by the wait
    assert any(token in chosen[4][row] and not any(token in chosen[c][row] for c in (2, 3))
               for row in range(2) for token in range(20))
    cache = run.layouts[next(iter(run.layouts))].last_output
    for row in range(2):  # the cache holds computed outputs only, never an extrapolated one
        for y in range(7):
            for x in range(9):
                token = _pixel_token(y, x, wp)
                latest = max([c for c in (2, 3, 4) if token in chosen[c][row]], default=1)
                assert torch.equal(cache[row, :, y, x], outputs[latest][row, :, y, x])


def test_extrapolation_must_be_a_share():
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(SettingsError, match="extrapolation"):
            CATSettings(extrapolation=bad)
