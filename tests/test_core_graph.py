"""Graph replay of pruned calls (cat_core/graph.py) on the CPU, with capture stand-ins.

The CUDA capture is one class; tests/graph_standin.py replaces it with CPU stand-ins of the same
interface, so the self-check, the fallback, re-capture on change and the notes all run here.
"""
from __future__ import annotations

import types

import pytest
import torch

from cat_core import CATSettings
from cat_core import graph as graph_mod
from cat_core.accounting import CallTokens
from cat_core.config import SettingsError
from cat_core.runtime import CallContext, CallMode
from tests import cat_harness, graph_standin

STEPS = 8


def _run(execution, layout="uncond_first", batch=1, steps=STEPS, **settings):
    model = cat_harness.tiny_model("sd3", seed=3)
    cond, uncond = cat_harness.random_cond(batch, 1), cat_harness.random_cond(batch, 2)
    noise = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    s = CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=1, execution=execution, **settings)
    return cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=steps, settings=s, layout=layout)


@pytest.fixture
def stand_in(monkeypatch):
    def use(cls=graph_standin.Recording):
        cls = graph_standin.fresh(cls)
        monkeypatch.setattr(graph_mod, "CAPTURE", cls)
        return cls
    return use


def _pruned(stats) -> int:
    return sum(c.mode == "pruned" for c in stats.calls)


def _graph_notes(stats) -> list:
    return [n for n in stats.notes if "graph" in n]


def _same_stats(a, b):
    assert [(c.step, c.mode, c.tokens_computed) for c in a.calls] == [(c.step, c.mode, c.tokens_computed) for c in b.calls]
    assert a.ledger.computed == b.ledger.computed and a.ledger.dense == b.ledger.dense


def test_execution_setting_is_validated():
    assert CATSettings().execution == "auto"
    for value in ("auto", "eager", "graph"):
        assert CATSettings(execution=value).execution == value
    with pytest.raises(SettingsError, match="execution"):
        CATSettings(execution="compiled")


@pytest.mark.parametrize("layout", ["uncond_first", "split"])
def test_replayed_calls_give_the_eager_images_and_stats(stand_in, layout):
    """Every pruned call after the first of each layout is a replay (reading static input copies),
    and images, per-call records and MACs equal the eager run's."""
    cls = stand_in()
    eager, eager_stats = _run("eager", layout)
    out, stats = _run("graph", layout)
    layouts = 2 if layout == "split" else 1
    assert torch.equal(out, eager)
    _same_stats(stats, eager_stats)
    assert stats.notes == eager_stats.notes and not _graph_notes(stats)
    assert stats.execution["captures"] == layouts == len(cls.instances)
    assert stats.execution["replayed"] == _pruned(stats) - layouts > 0
    assert sum(c.replays for c in cls.instances) == _pruned(stats)  # one self-check replay per capture
    assert eager_stats.execution == {}


def test_auto_uses_the_stand_in_too(stand_in):
    stand_in()
    eager, _ = _run("eager")
    out, stats = _run("auto")
    assert torch.equal(out, eager) and stats.execution["replayed"] > 0 and not _graph_notes(stats)


def test_graph_on_cpu_says_it_needs_cuda_and_runs_eager():
    eager, eager_stats = _run("eager")
    out, stats = _run("graph")
    assert torch.equal(out, eager)
    _same_stats(stats, eager_stats)
    notes = _graph_notes(stats)
    assert len(notes) == 1 and "needs a CUDA device" in notes[0] and "turned off" in notes[0]
    assert stats.execution["replayed"] == stats.execution["captures"] == 0


def test_auto_on_cpu_runs_eager_without_a_note():
    eager, _ = _run("eager")
    out, stats = _run("auto")
    assert torch.equal(out, eager) and not _graph_notes(stats)
    assert stats.execution["replayed"] == 0 and "CUDA" in stats.execution["eager_reason"]


@pytest.mark.parametrize("kind, why", [(graph_standin.Perturbed, "differed from the eager call"),
                                       (graph_standin.FailingCapture, "stand-in capture failed"),
                                       (graph_standin.FailingReplay, "stand-in replay failed")])
def test_a_bad_graph_falls_back_to_eager_for_the_rest_of_the_run(stand_in, kind, why, caplog):
    """A mismatch at the self-check, a capture error or a later replay error: that call and every
    later one give exactly the eager result, with one note and one log line."""
    cls = stand_in(kind)
    eager, eager_stats = _run("eager")
    with caplog.at_level("WARNING", logger="CAT Pruning"):
        out, stats = _run("graph")
    assert torch.equal(out, eager)
    _same_stats(stats, eager_stats)
    notes = _graph_notes(stats)
    assert len(notes) == 1 and "graph replay turned off" in notes[0] and why in notes[0], notes
    assert sum("graph replay turned off" in r.getMessage() for r in caplog.records) == 1
    assert len(cls.instances) == 1  # never captured again
    assert stats.execution["replayed"] == 0
    assert stats.fallback_reason is None  # pruning itself went on


def test_the_hosts_interrupt_passes_through_a_capture(monkeypatch):
    from cat_core.model_call import model_call

    class Interrupted(Exception):
        pass

    class Interrupting(graph_standin.Recording):
        def capture(self, fn):
            raise Interrupted()

    monkeypatch.setattr(graph_mod, "CAPTURE", graph_standin.fresh(Interrupting))
    run, x, call = _toy_run()
    with pytest.raises(Interrupted):
        model_call(run, x, torch.ones(1), ("c",), None, lambda ctx, hooks: call.run(ctx, call.inputs),
                   passthrough=(Interrupted,), graph=call)
    assert not run.stats.notes and run.stats.fallback_reason is None


def _toy_run():
    """A PruningRun one step past its capture call, and a GraphCall of a one-weight 'model'."""
    from cat_core.blocks import mmdit as mmdit_blocks
    from cat_core.model_call import model_call
    from cat_core.runtime import PruningRun

    run = PruningRun(CATSettings(warmup_steps=1, keep_ratio=0.25, execution="graph"), mmdit_blocks.describe(cat_harness.tiny_model("sd3")))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    w = torch.full((1,), 2.0)
    call = graph_mod.GraphCall({"x": x}, lambda ctx, inputs: inputs["x"] * w, lambda: [w])
    model_call(run, x, torch.ones(1), ("c",), None, lambda ctx, hooks: x * w, graph=call)  # capture call
    run.on_step_end(0)
    return run, x, call


# ---------------------------------------------------------------------------------------------
# GraphReplay on its own: what makes it capture again, and when it gives up
# ---------------------------------------------------------------------------------------------
class _Toy:
    """A pruned 'call' out = x * w (reading its token counts, as a first block does) through one GraphReplay."""

    def __init__(self, setting="graph", capture=graph_standin.Recording):
        self.notes = []
        self.capture = graph_standin.fresh(capture)
        self.replay = graph_mod.GraphReplay(setting, self.notes.append, self.capture)
        self.layout = types.SimpleNamespace(blocks=[], next_index=torch.zeros(1, 3, dtype=torch.long))
        self.w = torch.full((4,), 2.0)

    def run(self, ctx, inputs):
        if ctx.tokens is None:
            ctx.tokens = CallTokens(txt=7, img=inputs["x"].numel())
        return inputs["x"] * self.w

    def __call__(self, x, blocker=None, weights=None):
        ctx = CallContext(CallMode.PRUNED, self.layout, None)
        self.inputs = {"x": x, "opt": "o"}
        call = graph_mod.GraphCall(self.inputs, lambda c, i: self.run(c, i), weights or (lambda: [self.w]), blocker)
        replayed = self.replay.stats["replayed"]
        out = self.replay.call(ctx, call, x.device, lambda: self.run(ctx, call.inputs))
        # a replay runs no Python: the runtime charges it from the layout's token counts
        assert ctx.tokens == (None if self.replay.stats["replayed"] > replayed else CallTokens(txt=7, img=x.numel()))
        return out.clone()


def test_replays_read_the_new_inputs():
    toy = _Toy()
    for i in range(4):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        assert torch.equal(toy(x), x * toy.w)
    assert len(toy.capture.instances) == 1 and toy.replay.stats["replayed"] == 3 and not toy.notes


@pytest.mark.parametrize("change", ["weight in place", "weight replaced", "input shape", "input dtype", "buffer moved"])
def test_a_change_captures_again(change):
    toy = _Toy()
    x = torch.ones(4)
    toy(x), toy(x)
    if change == "weight in place":
        toy.w.mul_(3)
    elif change == "weight replaced":
        toy.w = toy.w * 3
    elif change == "input shape":
        x = torch.ones(2, 4)
    elif change == "input dtype":
        x = torch.ones(4, dtype=torch.float64)
    else:
        toy.layout.next_index = toy.layout.next_index.clone()
    assert torch.equal(toy(x), x * toy.w)
    assert torch.equal(toy(x), x * toy.w)
    assert len(toy.capture.instances) == 2 and toy.replay.stats["captures"] == 2 and not toy.notes


def test_inputs_that_keep_changing_turn_graphs_off():
    toy = _Toy()
    for n in range(1, graph_mod.MAX_CAPTURES + 3):
        x = torch.ones(n, 4)
        assert torch.equal(toy(x), x * toy.w)
    assert len(toy.capture.instances) == graph_mod.MAX_CAPTURES
    assert len(toy.notes) == 1 and "kept changing" in toy.notes[0]


@pytest.mark.parametrize("setting", ["graph", "auto"])
def test_a_blocker_runs_eager(setting):
    toy = _Toy(setting)
    x = torch.ones(4)
    for _ in range(3):
        assert torch.equal(toy(x, blocker="a ControlNet is applied"), x * toy.w)
    assert not toy.capture.instances
    assert toy.notes == (["graph replay not used where a ControlNet is applied; those pruned calls ran eager"] if setting == "graph" else [])
    toy(x), toy(x)  # without the blocker the layout is captured
    assert len(toy.capture.instances) == 1


@pytest.mark.parametrize("setting", ["graph", "auto"])
def test_weights_not_on_the_device_run_eager(setting):
    toy = _Toy(setting)
    x = torch.ones(4)
    offloaded = torch.empty(4, device="meta")
    for _ in range(2):
        assert torch.equal(toy(x, weights=lambda: [toy.w, offloaded]), x * toy.w)
    assert not toy.capture.instances
    assert (len(toy.notes) == 1 and "not resident" in toy.notes[0]) if setting == "graph" else not toy.notes


def test_the_self_check_catches_a_capture_that_counts_other_macs():
    """The token counts a capture run read (what its MACs follow from) must be eager's."""
    toy = _Toy()
    real_run = toy.run

    def run(ctx, inputs):
        if inputs is not toy.inputs:  # the static copies: a capture run
            ctx.tokens = CallTokens(txt=8, img=inputs["x"].numel())
        return real_run(ctx, inputs)

    toy.run = run
    x = torch.ones(4)
    for _ in range(3):
        assert torch.equal(toy(x), x * toy.w)
    assert len(toy.notes) == 1 and "MACs" in toy.notes[0] and toy.replay.stats["replayed"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graph capture and replay (none on this machine)")
def test_cuda_graph_replay_matches_eager_on_a_gpu():
    """The real capture class on a GPU: the harness model in fp32, graph vs eager."""
    model = cat_harness.tiny_model("sd3", seed=3).cuda()
    cond = tuple(t.cuda() for t in cat_harness.random_cond(1, 1))
    uncond = tuple(t.cuda() for t in cat_harness.random_cond(1, 2))
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for execution in ("eager", "graph"):
        s = CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=1, execution=execution)
        results[execution] = cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=STEPS, settings=s)
    (eager, eager_stats), (graph, stats) = results["eager"], results["graph"]
    assert not _graph_notes(stats), stats.notes
    assert stats.execution["replayed"] == _pruned(stats) - 1 > 0
    _same_stats(stats, eager_stats)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
