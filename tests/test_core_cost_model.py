"""The adapters' cost models (ModelInfo.cost): a call's MACs follow from shapes only, so the runtime
computes them once per layout and call shape and charges every call; blocks count nothing."""
from __future__ import annotations

import pytest
import torch

from cat_core import CATSettings
from cat_core import runtime
from cat_core.blocks import mmdit as mmdit_blocks
from tests import cat_harness

STEPS = 7  # warm-up 2, cool-down 1: dense, capture, 4 pruned, dense


class _Forgetful(dict):
    """A layout cost cache that keeps nothing: every call evaluates the cost model again."""

    def __setitem__(self, key, value):
        pass


def _sample(monkeypatch, layout: str, cache: bool = True):
    evaluated, read = [], []
    cost, tokens = mmdit_blocks.call_cost, mmdit_blocks.call_tokens
    monkeypatch.setattr(mmdit_blocks, "call_cost", lambda blocks, shape: evaluated.append(shape) or cost(blocks, shape))
    monkeypatch.setattr(mmdit_blocks, "call_tokens", lambda ctx, args: read.append(ctx.mode.value) or tokens(ctx, args))
    if not cache:
        init = runtime.LayoutState.__init__

        def forgetful_init(self, *a, **k):
            init(self, *a, **k)
            self.costs = _Forgetful()
        monkeypatch.setattr(runtime.LayoutState, "__init__", forgetful_init)
    model = cat_harness.tiny_model("sd3", depth=2)
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=1)
    cond, uncond = cat_harness.random_cond(1, 1), cat_harness.random_cond(1, 2)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    _, stats = cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=STEPS, settings=settings, layout=layout)
    monkeypatch.undo()
    return stats, evaluated, read


@pytest.mark.parametrize("layout", ["uncond_first", "split"])
def test_call_cost_is_computed_once_per_layout_and_shape(monkeypatch, layout):
    stats, evaluated, read = _sample(monkeypatch, layout)
    layouts = 2 if layout == "split" else 1
    modes = [c.mode for c in stats.calls]
    assert modes == [m for m in ["dense", "capture", "pruned", "pruned", "pruned", "pruned", "dense"] for _ in range(layouts)]
    # one dense shape (the capture call's too) and one pruned shape per layout, for 7 calls each
    assert len(evaluated) == 2 * layouts and len(set(evaluated)) == 2
    assert {s.computed for s in evaluated} == {None, CATSettings(keep_ratio=0.3).token_budget(64)}  # 8 x 8 tokens
    # the token counts are read once per call, by its first block, and only by calls that run hooks
    # (the cool-down call runs the model's own blocks and is charged from the layout's)
    assert read == [m for m in ["dense", "capture", "pruned", "pruned", "pruned", "pruned"] for _ in range(layouts)]
    # caching changes nothing: without it every call evaluates the cost model, to the same totals
    uncached, again, _ = _sample(monkeypatch, layout, cache=False)
    assert len(again) == len(stats.calls)
    assert uncached.ledger.computed == stats.ledger.computed and uncached.ledger.dense == stats.ledger.dense
    assert 0 < stats.ledger.total_computed < stats.ledger.total_dense
