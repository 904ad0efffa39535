"""Samplers whose images CAT cannot keep close yet run unpruned by default, and say so (host tier).

Which samplers those are, and which output cache keeps the others closest, is measured on the
trained fixture (tests/bench/quality.py; the README's sampler table) and held in
nodes/samplers.py. Here: the policy reaches the run through ComfyUI's real sampler objects.
"""
from __future__ import annotations

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

STEPS = 8


@pytest.fixture(scope="module")
def model(comfy):
    return ce.tiny_sd3("sd3", seed=61)


def run(pack, model, sampler, **kw):
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=1, **kw)
    patched = pack.nodes.patch.apply_cat(model, settings)
    out = ce.sample(patched, seed=4, steps=STEPS, cfg=4.0, sampler_name=sampler, scheduler="simple",
                    positive=ce.random_sd3_cond(1), negative=ce.random_sd3_cond(2), latent_hw=(16, 16))
    return out, pack.nodes.patch.holder_of(patched).last_stats


def plain(model, sampler):
    return ce.sample(model, seed=4, steps=STEPS, cfg=4.0, sampler_name=sampler, scheduler="simple",
                     positive=ce.random_sd3_cond(1), negative=ce.random_sd3_cond(2), latent_hw=(16, 16))


def test_every_comfyui_sampler_has_a_decision(pack, comfy):
    samplers = pack.nodes.samplers
    for name in comfy.samplers.SAMPLER_NAMES:
        found, cache, unsupported, reuse = samplers.sampler_support(comfy.samplers.sampler_object(name))
        assert found == ("euler" if name == "ddim" else name)
        assert (cache is None) != (unsupported is None), name
        assert unsupported != samplers.UNMEASURED, f"{name} is in neither table of nodes/samplers.py"
        assert reuse == (samplers.SAMPLER_REUSE_THRESHOLD if name in samplers.REUSE_INSTEAD else None), name


def test_supported_sampler_prunes_with_its_cache(pack, model):
    samplers = pack.nodes.samplers
    for name, cache in samplers.SUPPORTED.items():
        if name in ("dpm_fast", "dpm_adaptive") or name in samplers.REUSE_INSTEAD:
            continue  # few callbacks: these prune only at longer runs; step reuse: the test below
        out, stats = run(pack, model, name)
        assert any(c.mode == "pruned" for c in stats.calls), name
        assert not stats.notes and torch.isfinite(out).all(), (name, stats.notes)


def test_unsupported_sampler_runs_unpruned_and_says_why(pack, model):
    samplers = pack.nodes.samplers
    name = next(n for n in samplers.UNSUPPORTED if n not in samplers.REUSE_INSTEAD)
    out, stats = run(pack, model, name)
    assert torch.equal(out, plain(model, name)), "an unpruned run must give the unpatched image"
    assert {c.mode for c in stats.calls} == {"dense"} and stats.ledger.saved_fraction() == 0.0
    assert stats.notes and stats.notes[0].startswith(f"not pruned: sampler {name} ") and "prune_any_sampler" in stats.notes[0]
    assert stats.notes[0] in pack.cat_core.report.format_report(stats)
    forced, forced_stats = run(pack, model, name, prune_any_sampler=True)
    assert any(c.mode == "pruned" for c in forced_stats.calls) and not forced_stats.notes
    assert torch.isfinite(forced).all()


def test_cache_space_follows_the_sampler(pack, model, monkeypatch):
    """The merge caches what the table says: for a "denoised" sampler the reused tokens' denoised
    output is the cached denoised output itself."""
    seen = []
    runtime = pack.cat_core.runtime.PruningRun
    original = runtime.use_sampler

    def record(self, name, cache, unsupported=None, reuse_instead=None):
        original(self, name, cache, unsupported, reuse_instead)
        seen.append((name, self.cache_space))

    monkeypatch.setattr(runtime, "use_sampler", record)
    for name, cache in pack.nodes.samplers.SUPPORTED.items():
        if name in ("euler", "dpmpp_2m"):
            run(pack, model, name, prune_any_sampler=True)  # token pruning (dpmpp_2m would reuse steps)
            assert seen[-1] == (name, cache)
    run(pack, model, "euler", cache_space="denoised")
    assert seen[-1] == ("euler", "denoised")  # an explicit setting wins over the table


def test_a_custom_sampler_object_is_unmeasured(pack):
    class MySampler:
        pass

    name, cache, unsupported, reuse = pack.nodes.samplers.sampler_support(MySampler())
    assert name == "MySampler" and cache is None and unsupported == pack.nodes.samplers.UNMEASURED and reuse is None


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral"], ids=["supported", "unsupported"])
def test_reuse_instead_sampler_reuses_steps_by_default(pack, model, name, monkeypatch):
    """Samplers whose images step reuse keeps closer than token pruning: with the defaults their
    runs reuse whole calls (x0 cache) instead of pruning tokens, and CAT Stats says so; the
    user's own threshold or prune_any_sampler wins."""
    samplers = pack.nodes.samplers
    assert name in samplers.REUSE_INSTEAD
    # this untrained model's output moves too much for the shipped threshold to ever reuse
    monkeypatch.setattr(samplers, "SAMPLER_REUSE_THRESHOLD", 0.9)
    settings = dict(keep_ratio=0.3, warmup_steps=2, cooldown_steps=1)
    patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(**settings))
    steps = 16  # long enough for the predictor to reuse
    kw = dict(seed=4, steps=steps, cfg=4.0, sampler_name=name, scheduler="simple",
              positive=ce.random_sd3_cond(1), negative=ce.random_sd3_cond(2), latent_hw=(16, 16))
    out = ce.sample(patched, **kw)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    modes = {c.mode for c in stats.calls}
    assert "pruned" not in modes and "reuse" in modes, modes
    assert stats.reuse_used == samplers.SAMPLER_REUSE_THRESHOLD and torch.isfinite(out).all()
    assert len(stats.notes) == 1 and stats.notes[0].startswith(f"tokens not pruned: sampler {name} ")
    report = pack.cat_core.report.format_report(stats)
    assert stats.notes[0] in report and f"Step reuse {samplers.SAMPLER_REUSE_THRESHOLD:g}:" in report

    own = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(**settings, reuse_threshold=0.5))
    ce.sample(own, **kw)
    own_stats = pack.nodes.patch.holder_of(own).last_stats
    assert own_stats.reuse_used == 0.5 and not any(n.startswith(f"tokens not pruned: sampler {name} keeps") for n in own_stats.notes)

    forced = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(**settings, prune_any_sampler=True))
    ce.sample(forced, **kw)
    forced_stats = pack.nodes.patch.holder_of(forced).last_stats
    assert any(c.mode == "pruned" for c in forced_stats.calls) and forced_stats.reuse_used == 0.0 and not forced_stats.notes
