"""Graph replay (execution setting) through ComfyUI's real sampler and CAT's APPLY_MODEL wrapper.

On this CPU machine `execution="graph"` must say it needs CUDA and give the eager result. With
the CPU capture stand-in of tests/graph_standin.py put in place of the CUDA capture, pruned calls
are captured once per layout, replayed on static copies of ComfyUI's inputs (latent, timestep,
text context, extra conds such as Flux guidance and Kontext reference latents), and must give
the eager images and MACs exactly.
"""
from __future__ import annotations

import pytest
import torch

from tests import graph_standin
from tests.host import comfy_env as ce
from tests.host import test_cat_flux as flux_case

pytestmark = pytest.mark.host

STEPS, WARMUP = 7, 2


@pytest.fixture(scope="module")
def models(comfy):
    return {"sd3": ce.tiny_sd3("sd3", seed=61), "sd35_medium": ce.tiny_sd3("sd35_medium", seed=62),
            "flux": ce.tiny_flux("flux", seed=63), "flux2": ce.tiny_flux("flux2", seed=64)}


def sample(pack, model, kind, execution, *, batch=2, split=False, kontext=False):
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=WARMUP, cooldown_steps=1, execution=execution)
    patched = pack.nodes.patch.apply_cat(model, settings)
    if kind.startswith("sd3"):
        out = ce.sample(patched, seed=3, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
                        positive=ce.random_sd3_cond(1, batch), negative=ce.random_sd3_cond(2, batch),
                        batch=batch, latent_hw=(12, 16), force_split_cfg=split)
    else:
        out = flux_case.run(patched, kind, batch=batch, latent_hw=(12, 16), cfg=3.5, steps=STEPS, kontext=kontext)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
    return out, stats


def same_run(stats, eager_stats):
    assert [(c.step, c.mode, c.tokens_computed) for c in stats.calls] == [(c.step, c.mode, c.tokens_computed) for c in eager_stats.calls]
    assert stats.ledger.computed == eager_stats.ledger.computed and stats.ledger.dense == eager_stats.ledger.dense


def graph_notes(stats):
    return [n for n in stats.notes if "graph" in n]


@pytest.fixture
def stand_in(pack, monkeypatch):
    cls = graph_standin.fresh(graph_standin.Recording)
    monkeypatch.setattr(pack.cat_core.graph, "CAPTURE", cls)
    return cls


CASES = [("sd3", {}), ("sd3", {"split": True}), ("sd35_medium", {}), ("flux", {"kontext": True}), ("flux2", {"batch": 1})]


@pytest.mark.parametrize("kind, kw", CASES)
def test_graph_on_cpu_says_it_needs_cuda_and_gives_the_eager_result(pack, models, kind, kw):
    eager, eager_stats = sample(pack, models[kind], kind, "eager", **kw)
    out, stats = sample(pack, models[kind], kind, "graph", **kw)
    assert torch.equal(out, eager)
    same_run(stats, eager_stats)
    notes = graph_notes(stats)
    assert len(notes) == 1 and "needs a CUDA device" in notes[0], stats.notes
    assert "needs a CUDA device" in pack.cat_core.report.format_report(stats)


@pytest.mark.parametrize("kind, kw", CASES)
def test_replays_through_comfys_wrapper_give_the_eager_images_and_macs(pack, models, stand_in, kind, kw):
    eager, eager_stats = sample(pack, models[kind], kind, "eager", **kw)
    out, stats = sample(pack, models[kind], kind, "graph", **kw)
    layouts = 2 if kw.get("split") else 1
    pruned = sum(c.mode == "pruned" for c in stats.calls)
    assert torch.equal(out, eager)
    same_run(stats, eager_stats)
    assert not graph_notes(stats), stats.notes
    assert stats.execution["captures"] == layouts == len(stand_in.instances)
    assert stats.execution["replayed"] == pruned - layouts > 0
    assert f"{pruned - layouts} pruned calls replayed" in pack.cat_core.report.format_report(stats)


def test_a_mismatching_replay_falls_back_to_the_eager_images(pack, models, monkeypatch):
    monkeypatch.setattr(pack.cat_core.graph, "CAPTURE", graph_standin.fresh(graph_standin.Perturbed))
    eager, eager_stats = sample(pack, models["flux"], "flux", "eager")
    out, stats = sample(pack, models["flux"], "flux", "graph")
    assert torch.equal(out, eager)
    same_run(stats, eager_stats)
    notes = graph_notes(stats)
    assert len(notes) == 1 and "turned off" in notes[0] and "differed" in notes[0]
    assert stats.execution["replayed"] == 0
