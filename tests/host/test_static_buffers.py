"""Pruned calls that a GPU can run ahead of the host: no host syncs, no reallocated buffers (host tier).

A host sync (`.item()`, `nonzero`, a boolean mask index, a data-dependent shape) stalls the CPU
until the GPU catches up, and a replayed CUDA graph reads fixed addresses. On this CPU machine
both are checked at the dispatcher: the aten ops of each pruned model call (blocks, merge and the
next selection, everything CAT's APPLY_MODEL wrapper does) are recorded, and the storage of every
buffer of the call layout is compared between consecutive pruned calls.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

aten = torch.ops.aten
#: ops that wait for the device: scalar reads, and outputs whose shape depends on the data
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default, aten._unique2.default,
            aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
            aten.masked_scatter.default}
STEPS, WARMUP = 7, 2


class SyncOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.seen[str(func)] += 1
        elif func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.seen["aten.index.Tensor (boolean mask)"] += 1
        return func(*args, **kwargs)


def layout_buffers(run) -> dict:
    """Every tensor a call layout keeps between calls, by name: {name: data_ptr}."""
    out = {}
    for n, layout in enumerate(run.layouts.values()):
        for name in ("last_output", "reference", "labels", "staleness", "next_index", "refreshes", "tiebreak"):
            t = getattr(layout, name)
            if t is not None:
                out[f"{n}.{name}"] = t.data_ptr()
        for b, cache in enumerate(layout.blocks):
            for name in ("k", "v", "k2", "v2"):
                t = getattr(cache, name)
                if t is not None:
                    out[f"{n}.block{b}.{name}"] = t.data_ptr()
    return out


class Recorder:
    """Outermost APPLY_MODEL wrapper: sync ops per call and, for patched models, the run's buffers."""

    def __init__(self, run_key):
        self.run_key = run_key
        self.calls = []  # (syncs Counter, buffers dict or None)

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        mode = SyncOps()
        with mode:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        run = transformer_options.get(self.run_key)
        self.calls.append((mode.seen, layout_buffers(run) if run is not None else None))
        return out


MODELS = {"sd3": lambda: ce.tiny_sd3("sd3", seed=51), "sd35_medium": lambda: ce.tiny_sd3("sd35_medium", seed=52),
          "flux": lambda: ce.tiny_flux("flux", seed=53), "flux2": lambda: ce.tiny_flux("flux2", seed=54),
          "chroma": lambda: ce.tiny_flux("chroma", seed=55)}


def sample_recorded(pack, comfy, model, kind, settings=None):
    recorder = Recorder(pack.nodes.patch.RUN_KEY)
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "cat_tests_sync", recorder)
    target = recorded if settings is None else pack.nodes.patch.apply_cat(recorded, settings)
    if kind in ce.SD3_LAYOUTS:
        pos, neg, latent = ce.random_sd3_cond(1, 2), ce.random_sd3_cond(2, 2), torch.zeros(2, 16, 12, 16)
    else:
        vec = 64 if kind == "flux" else None
        guidance = 0.0 if kind == "chroma" else 3.5
        pos, neg = (ce.flux_cond(seed, 1, tokens=7, vec_dim=vec, guidance=guidance) for seed in (1, 2))
        latent = torch.zeros(1, 128 if kind == "flux2" else 16, 12, 16)
    ce.sample(target, seed=5, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
              positive=pos, negative=neg, latent_image=latent)
    stats = None if settings is None else pack.nodes.patch.holder_of(target).last_stats
    return recorder.calls, stats


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("refresh", [True, False])
def test_pruned_calls_add_no_host_sync_and_keep_their_buffers(pack, comfy, kind, refresh):
    model = MODELS[kind]()
    plain_calls, _ = sample_recorded(pack, comfy, model, kind)
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=WARMUP, cooldown_steps=0, refresh_first_block=refresh)
    calls, stats = sample_recorded(pack, comfy, model, kind, settings)
    modes = [c.mode for c in stats.calls]
    assert stats.fallback_reason is None and modes.count("pruned") >= 3, modes
    assert len(calls) == len(plain_calls) == len(modes)

    pruned = [i for i, mode in enumerate(modes) if mode == "pruned"]
    for i in pruned:  # ComfyUI's own code (outside the blocks) may sync; CAT's part may not
        extra = calls[i][0] - plain_calls[i][0]
        assert not extra, f"call {i} ({modes[i]}) syncs with the host: {dict(extra)}"
    first = calls[pruned[0]][1]
    assert first and all(f"0.block{b}.k" in first for b in range(stats.block_math["blocks"]))
    for i in pruned[1:]:
        moved = sorted(name for name, ptr in calls[i][1].items() if first.get(name) != ptr)
        assert moved == [], f"pruned call {i} reallocated {moved}"


def test_the_sync_check_sees_a_host_sync(pack, comfy, monkeypatch):
    """The check can fail: a selection that reads a value on the host is caught."""
    model = MODELS["sd3"]()
    plain_calls, _ = sample_recorded(pack, comfy, model, "sd3")
    runtime = pack.cat_core.runtime
    original = runtime.drift_scores

    def drift_scores_with_a_sync(*args, **kwargs):
        scores = original(*args, **kwargs)
        if scores.max().item() < 0:  # a data-dependent branch, as a careless change might add
            raise AssertionError("unreachable")
        return scores

    monkeypatch.setattr(runtime, "drift_scores", drift_scores_with_a_sync)
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=WARMUP, cooldown_steps=0)
    calls, stats = sample_recorded(pack, comfy, model, "sd3", settings)
    pruned = [i for i, c in enumerate(stats.calls) if c.mode == "pruned"]
    assert all(calls[i][0] - plain_calls[i][0] for i in pruned)
