"""cat_core.runtime: call modes, layouts, fallback, end-of-run cleanup, and whole sampling runs
through the host-free harness (exactness at keep 1.0, savings, no leaks, cache size)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cat_core import CallMode, CATSettings, PruningRun
from cat_core.blocks import mmdit as mmdit_blocks
from cat_core.blocks.hooks import CALL_KEY
from cat_core.tokens import token_grid
from tests import cat_harness

TXT = 16  # text tokens of cat_harness.random_cond


_MODELS = {}


def model_for(layout, depth=2):
    key = (layout, depth)
    if key not in _MODELS:
        _MODELS[key] = cat_harness.tiny_model(layout, depth=depth)
    return _MODELS[key]


def _info():
    """The runtime's view of a tiny 2-block SD3 model (patch 2); the fake-output tests run no blocks."""
    return mmdit_blocks.describe(model_for("sd3"))


def _drive(run, shape, keys, steps, seed=0, calls_per_step=1):
    """Feed the run fake model outputs (no blocks): returns [(step, mode)] per call."""
    g = torch.Generator().manual_seed(seed)
    modes = []
    for step in range(steps):
        for _ in range(calls_per_step):
            ctx = run.begin_call(shape, keys, "cpu")
            run.end_call(ctx, torch.randn(*shape, generator=g))
            modes.append((step, ctx.mode))
        run.on_step_end(step)
    return modes


def _expected_mode(step, warmup, total_steps=None, cooldown=0):
    """Warm-up, capture, pruned, cool-down; all dense when no step would be left to prune."""
    full_from = None if total_steps is None else total_steps - cooldown
    if full_from is not None and full_from <= warmup:
        full_from = warmup - 1
    if step < warmup - 1 or (full_from is not None and step >= full_from):
        return CallMode.DENSE
    return CallMode.CAPTURE if step == warmup - 1 else CallMode.PRUNED


# ============================================================================ modes (no model)
@pytest.mark.parametrize("warmup", [1, 2, 5])
def test_mode_sequence_over_steps(warmup):
    run = PruningRun(CATSettings(warmup_steps=warmup, num_clusters=3), _info())
    modes = _drive(run, (2, 4, 8, 10), ("cond",), 8)
    assert [m for _, m in modes] == [_expected_mode(s, warmup) for s in range(8)]
    recorded = [(c.step, c.mode) for c in run.stats.calls]
    assert recorded == [(s, m.value) for s, m in modes]


def test_multi_call_steps_share_the_step_mode():
    run = PruningRun(CATSettings(warmup_steps=3, num_clusters=3), _info())
    modes = _drive(run, (1, 4, 8, 8), ("cond",), 6, calls_per_step=2)
    for step, mode in modes:
        assert mode is _expected_mode(step, 3)


def test_fewer_steps_than_warmup_never_prunes():
    run = PruningRun(CATSettings(warmup_steps=8), _info())
    modes = _drive(run, (1, 4, 8, 8), ("cond",), 6)
    assert {m for _, m in modes} == {CallMode.DENSE}
    stats = run.finish()
    assert stats.ledger.saved_fraction() == 0.0
    assert stats.peak_cache_bytes == 0
    assert stats.staleness_maps == [] and stats.selection_masks == []


def test_new_layout_after_warmup_captures_then_prunes():
    run = PruningRun(CATSettings(warmup_steps=2, num_clusters=3), _info())
    g = torch.Generator().manual_seed(0)
    a_shape, b_shape, c_shape = (2, 4, 8, 8), (1, 4, 8, 8), (2, 4, 6, 10)
    log = []
    for step in range(7):
        calls = [("a", a_shape, ("uncond", "cond"))]
        if step >= 3:
            calls.append(("b", b_shape, ("cond",)))  # a different batch / chunk keys
        if step >= 4:
            calls.append(("c", c_shape, ("uncond", "cond")))  # same keys, different size
        if step >= 5:
            calls.append(("d", a_shape, ("cond", "uncond")))  # same shape, different key order
        for name, shape, keys in calls:
            ctx = run.begin_call(shape, keys, "cpu")
            run.end_call(ctx, torch.randn(*shape, generator=g))
            log.append((step, name, ctx.mode))
        run.on_step_end(step)
    modes = {}
    for step, name, mode in log:
        modes.setdefault(name, []).append(mode)
    P, C, D = CallMode.PRUNED, CallMode.CAPTURE, CallMode.DENSE
    assert modes["a"] == [D, C, P, P, P, P, P]
    assert modes["b"] == [C, P, P, P]
    assert modes["c"] == [C, P, P]
    assert modes["d"] == [C, P]
    assert len(run.layouts) == 4


def test_pruned_end_call_merges_fresh_and_cached_outputs():
    info = _info()
    run = PruningRun(CATSettings(warmup_steps=1, keep_ratio=0.25, num_clusters=4), info)
    shape = (2, 4, 7, 9)  # odd latent: grid 4 x 5 = 20 tokens, budget 5
    g = torch.Generator().manual_seed(3)
    ctx = run.begin_call(shape, ("c",), "cpu")
    assert ctx.mode is CallMode.CAPTURE
    first = torch.randn(*shape, generator=g)
    merged, mask = run.end_call(ctx, first)
    assert mask is None and torch.equal(merged, first)
    run.on_step_end(0)
    ctx = run.begin_call(shape, ("c",), "cpu")
    assert ctx.mode is CallMode.PRUNED
    index = ctx.index.clone()
    assert index.shape == (2, 5) and torch.all(index[:, 1:] > index[:, :-1])
    fresh = torch.randn(*shape, generator=g)
    merged, mask = run.end_call(ctx, fresh)
    hp, wp = token_grid(7, 9, 2)
    for b in range(2):
        for y in range(7):
            for x in range(9):
                chosen = (y // 2) * wp + x // 2 in index[b].tolist()
                assert bool(mask[b, 0, y, x]) == chosen
                src = fresh if chosen else first
                assert torch.equal(merged[b, :, y, x], src[b, :, y, x])
    record = run.stats.calls[-1]
    assert record.mode == "pruned" and record.tokens_computed == 2 * 5 and record.tokens_total == 2 * 20


def test_runtime_clusters_are_spatial_with_small_feature_scale():
    rng = np.random.default_rng(0)
    spreads = {}
    for scale in (0.05, 100.0):
        run = PruningRun(CATSettings(warmup_steps=1, num_clusters=12, feature_scale=scale), _info())
        _drive(run, (1, 4, 24, 24), ("c",), 1, seed=5)  # iid outputs: no spatial structure
        labels = run.finish().cluster_maps[0][0].reshape(-1).numpy()
        rows, cols = np.divmod(np.arange(144), 12)
        pos = np.stack([rows, cols], 1).astype(float)

        def spread(lab):
            return np.mean([((pos[lab == c] - pos[lab == c].mean(0)) ** 2).sum(1).mean() for c in np.unique(lab)])

        spreads[scale] = spread(labels) / spread(rng.permutation(labels))
    assert spreads[0.05] < 0.2 < 0.5 < spreads[100.0]


def test_disable_makes_later_calls_dense_and_keeps_first_reason():
    run = PruningRun(CATSettings(warmup_steps=2, num_clusters=3), _info())
    _drive(run, (1, 4, 8, 8), ("cond",), 4)
    layout = next(iter(run.layouts.values()))
    assert layout.ready
    run.disable("RuntimeError: boom")
    run.disable("ValueError: later")
    assert run.stats.fallback_reason == "RuntimeError: boom"
    assert not layout.ready and layout.next_index is None and layout.last_output is None
    g = torch.Generator().manual_seed(1)
    for step in range(4, 7):
        for shape, keys in (((1, 4, 8, 8), ("cond",)), ((2, 4, 10, 8), ("u", "c"))):
            ctx = run.begin_call(shape, keys, "cpu")
            assert ctx.mode is CallMode.DENSE
            merged, mask = run.end_call(ctx, torch.randn(*shape, generator=g))
            assert mask is None
        run.on_step_end(step)
    stats = run.finish()
    assert [c.mode for c in stats.calls[-6:]] == ["dense"] * 6
    assert stats.fallback_reason == "RuntimeError: boom"


def test_finish_releases_caches_and_moves_stats_to_cpu():
    model = model_for("sd35_medium")
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=4)
    options, run = cat_harness.patch_options(model, settings)
    cond, unc = cat_harness.random_cond(2, 1), cat_harness.random_cond(2, 2)
    x = torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    n_calls = {"split": 0}
    with torch.no_grad():
        for step in range(4):
            for keys, (ctx_t, pooled) in ((("cond",), cond), (("uncond",), unc)):
                call = run.begin_call(x.shape, keys, x.device)
                opts = dict(options)
                opts[CALL_KEY] = call
                v = model(x, torch.full((2,), 900.0 - 200 * step), context=ctx_t, y=pooled, transformer_options=opts)
                run.end_call(call, v)
                n_calls["split"] += 1
            run.on_step_end(step)
    layouts = list(run.layouts.values())
    assert all(l.blocks[0].k is not None for l in layouts)
    stats = run.finish()
    assert run.layouts == {}
    for l in layouts:
        assert all(b.k is None and b.v is None and b.k2 is None and b.v2 is None for b in l.blocks)
        assert l.last_output is None and l.reference is None and l.next_index is None
        assert l.cache_bytes() == 0
    hp, wp = token_grid(12, 10, 2)
    for maps in (stats.refresh_maps, stats.staleness_maps, stats.cluster_maps):
        assert len(maps) == 2
        for m in maps:
            assert m.device.type == "cpu" and m.shape == (2, hp, wp)
    assert len(stats.selection_masks) == 2
    for m in stats.selection_masks:
        assert m.device.type == "cpu" and m.dtype == torch.bool and m.shape == (2, 2, hp, wp)  # 2 pruned calls
        budget = settings.token_budget(hp * wp)
        assert torch.all(m.sum(dim=(2, 3)) == budget)
    # refreshes: every dense/capture call refreshes all tokens, pruned calls their selection.
    for refresh, masks in zip(stats.refresh_maps, stats.selection_masks):
        assert torch.equal(refresh, 2 + masks.float().sum(0))
    for labels in stats.cluster_maps:
        assert int(labels.min()) >= 0 and int(labels.max()) < 4


# ============================================================================ whole runs
def _sample(model, *, batch, hw, steps, settings=None, cfg=5.0, sampler="euler", layout="uncond_first",
            denoise=1.0, seed=0):
    cond = cat_harness.random_cond(batch, 100 + seed)
    unc = cat_harness.random_cond(batch, 200 + seed)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, *hw, generator=g)
    init = torch.randn(batch, 16, *hw, generator=g) * 0.5 if denoise < 1.0 else None
    return cat_harness.sample(model, cond=cond, uncond=unc, noise=noise, steps=steps, cfg=cfg, settings=settings,
                              sampler=sampler, layout=layout, denoise=denoise, init_latent=init)


# model layout, batch layout, batch, latent size, sampler, cfg, denoise: every pair of values that
# matters appears in some case (cfg 1 makes the batch layout irrelevant).
EXACT_CASES = [
    ("sd3", "uncond_first", 1, (32, 32), "euler", 5.0, 1.0),
    ("sd3", "cond_first", 2, (25, 30), "euler", 5.0, 0.6),
    ("sd3", "split", 1, (25, 30), "heun", 5.0, 1.0),
    ("sd35_large", "uncond_first", 2, (25, 30), "heun", 5.0, 0.6),
    ("sd35_large", "cond_first", 1, (32, 32), "heun", 5.0, 1.0),
    ("sd35_large", "split", 2, (32, 32), "euler", 5.0, 0.6),
    ("sd35_medium", "uncond_first", 1, (25, 30), "euler", 5.0, 0.6),
    ("sd35_medium", "cond_first", 2, (32, 32), "heun", 5.0, 0.6),
    ("sd35_medium", "split", 2, (25, 30), "euler", 5.0, 1.0),
    ("sd3", "uncond_first", 2, (32, 32), "heun", 1.0, 1.0),
    ("sd35_large", "uncond_first", 1, (25, 30), "euler", 1.0, 0.6),
    ("sd35_medium", "uncond_first", 2, (25, 30), "heun", 1.0, 1.0),
    ("sd35_medium", "split", 1, (32, 32), "heun", 1.0, 0.6),
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_keep_one_reproduces_unpatched_exactly(case):
    arch, layout, batch, hw, sampler, cfg, denoise = case
    model = model_for(arch)
    kwargs = dict(batch=batch, hw=hw, steps=6, cfg=cfg, sampler=sampler, layout=layout, denoise=denoise)
    ref, none = _sample(model, **kwargs)
    assert none is None
    out, stats = _sample(model, settings=CATSettings(keep_ratio=1.0, warmup_steps=2, num_clusters=5), **kwargs)
    assert torch.equal(out, ref)
    modes = {c.mode for c in stats.calls}
    assert modes == {"dense", "capture", "pruned"}  # the pruned code path really ran
    assert stats.ledger.saved_fraction() == pytest.approx(0.0, abs=1e-12)
    assert stats.ledger.total_computed == stats.ledger.total_dense


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_modes_follow_the_step_label_in_whole_runs(sampler):
    model = model_for("sd3")
    _, stats = _sample(model, batch=1, hw=(16, 16), steps=6, sampler=sampler,
                       settings=CATSettings(keep_ratio=0.5, warmup_steps=3, num_clusters=4))
    calls_per_step = 2 if sampler == "heun" else 1
    assert len(stats.calls) == 6 * calls_per_step - (calls_per_step - 1)
    for c in stats.calls:
        assert c.mode == _expected_mode(c.step, 3, 6, CATSettings().cooldown_steps).value, (c.step, c.mode)
        assert c.rows == 2 and c.tokens_total == 2 * 64
        assert c.tokens_computed == (2 * 32 if c.mode == "pruned" else 2 * 64)
    steps = stats.steps()
    assert [s["step"] for s in steps] == sorted({c.step for c in stats.calls})
    assert sum(s["calls"] for s in steps) == len(stats.calls)


@pytest.mark.parametrize("steps", [1, 3, 5, 6, 7])  # 6, 7: no step left after the capture and the cool-down
def test_run_shorter_than_warmup_is_exact_and_saves_nothing(steps):
    model = model_for("sd35_large")
    kwargs = dict(batch=1, hw=(16, 20), steps=steps, sampler="heun")
    ref, _ = _sample(model, **kwargs)
    out, stats = _sample(model, settings=CATSettings(keep_ratio=0.3, warmup_steps=6), **kwargs)
    assert torch.equal(out, ref)
    assert all(c.mode == "dense" for c in stats.calls)
    assert stats.ledger.saved_fraction() == 0.0
    assert stats.peak_cache_bytes == 0


@pytest.mark.parametrize("arch", ["sd3", "sd35_large", "sd35_medium"])
def test_keep_03_saves_macs_and_stays_finite(arch):
    model = model_for(arch)
    kwargs = dict(batch=1, hw=(32, 32), steps=10, layout="split")
    ref, _ = _sample(model, **kwargs)
    out, stats = _sample(model, settings=CATSettings(keep_ratio=0.3, warmup_steps=3, cooldown_steps=0), **kwargs)
    assert torch.isfinite(out).all()
    assert stats.ledger.saved_fraction() > 0.3
    assert stats.ledger.computed["joint_blocks"] < 0.6 * stats.ledger.dense["joint_blocks"]
    assert not torch.equal(out, ref)  # pruning changed something ...
    assert cat_harness.psnr(out, ref, peak=float(ref.abs().max())) > 10  # ... but not into noise
    assert sum(c.mode == "pruned" for c in stats.calls) == 2 * 7  # two layouts (split CFG), steps 3..9


def test_consecutive_runs_do_not_leak():
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=6)
    a_kwargs = dict(batch=1, hw=(16, 16), steps=5, layout="split", seed=1)
    b_kwargs = dict(batch=2, hw=(14, 18), steps=5, layout="uncond_first", sampler="heun", seed=2)
    a_alone, _ = _sample(cat_harness.tiny_model("sd35_medium"), settings=settings, **a_kwargs)
    b_alone, _ = _sample(cat_harness.tiny_model("sd35_medium"), settings=settings, **b_kwargs)
    model = cat_harness.tiny_model("sd35_medium")
    a1, sa1 = _sample(model, settings=settings, **a_kwargs)
    b1, sb1 = _sample(model, settings=settings, **b_kwargs)
    a2, sa2 = _sample(model, settings=settings, **a_kwargs)
    assert torch.equal(a1, a_alone) and torch.equal(a2, a_alone)
    assert torch.equal(b1, b_alone)
    assert sa1.ledger.computed == sa2.ledger.computed
    assert len(sb1.refresh_maps) == 1 and sb1.refresh_maps[0].shape == (4, 7, 9)


def _hand_cache_bytes(arch, depth, rows, hw):
    hp, wp = token_grid(*hw, 2)
    n, d = hp * wp, 64 * depth
    x_blocks = 1 if arch == "sd35_medium" else 0
    kv = depth * (TXT + n) * d * rows * 2 * 4  # K and V, text + image, fp32
    kv2 = x_blocks * n * d * rows * 2 * 4  # image-only K2/V2 of MMDiT-X blocks
    return kv + kv2


@pytest.mark.parametrize("arch,layout,batch,hw,depth", [
    ("sd3", "uncond_first", 1, (16, 16), 2),
    ("sd35_large", "split", 2, (13, 18), 2),
    ("sd35_medium", "cond_first", 1, (16, 16), 3),
    ("sd35_medium", "split", 1, (15, 12), 2),
])
def test_peak_cache_bytes_is_the_kv_size(arch, layout, batch, hw, depth):
    model = model_for(arch, depth)
    _, stats = _sample(model, batch=batch, hw=hw, steps=4, layout=layout,
                       settings=CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=4))
    assert stats.peak_cache_bytes == _hand_cache_bytes(arch, depth, 2 * batch, hw)
    _, single = _sample(model, batch=batch, hw=hw, steps=4, cfg=1.0,
                        settings=CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=4))
    assert single.peak_cache_bytes == _hand_cache_bytes(arch, depth, batch, hw)
    assert math.isclose(stats.peak_cache_bytes, 2 * single.peak_cache_bytes)


# ============================================================================ drift semantics
def _token_pixels(latent, token, wp, value):
    """Add `value` to every latent pixel of `token` (patch 2)."""
    r, c = divmod(token, wp)
    latent[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += value


def test_selection_follows_drift_first_from_warmup_then_from_reference():
    """Ranking "reference_drift" (the paper's), one cluster, no staleness share: the selection is the
    top-k drift, measured between the last two warm-up outputs for the first pruned call, then
    against the capture output."""
    run = PruningRun(CATSettings(warmup_steps=2, keep_ratio=0.25, num_clusters=1, stale_share=0.0,
                                 ranking="reference_drift"), _info())
    shape, wp = (1, 4, 8, 8), 4  # 16 tokens, budget 4
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g)
    b = a.clone()
    for token, amount in ((1, 5.0), (6, 4.0), (9, 3.0), (14, 2.0)):
        _token_pixels(b, token, wp, amount)

    def call(out):
        ctx = run.begin_call(shape, ("c",), "cpu")
        if ctx.index is not None:  # the layout's index buffer receives the next selection in end_call
            ctx.index = ctx.index.clone()
        assert out.data_ptr() not in [t.data_ptr() for l in run.layouts.values() for t in (l.last_output, l.next_index) if t is not None]
        merged, _ = run.end_call(ctx, out)
        run.on_step_end(run.step)
        return ctx, merged

    assert call(a)[0].mode is CallMode.DENSE
    assert call(b)[0].mode is CallMode.CAPTURE  # b is the reference
    # First pruned output: token 1 moves far from the reference, 6, 9, 14 a little.
    c = b.clone()
    _token_pixels(c, 1, wp, 10.0)
    for token in (6, 9, 14):
        _token_pixels(c, token, wp, 1.0)
    ctx, _ = call(c)
    assert ctx.mode is CallMode.PRUNED and ctx.index[0].tolist() == [1, 6, 9, 14]  # drift b - a
    # Next output: token 1 back at the reference (but far from its previous output); 6, 9, 14 drift more.
    d = b.clone()
    for token in (6, 9, 14):
        _token_pixels(d, token, wp, 2.0)
    ctx, _ = call(d)
    assert ctx.index[0].tolist() == [1, 6, 9, 14]  # drift c - b: only these four moved
    layout = next(iter(run.layouts.values()))
    chosen = layout.next_index[0].tolist()
    # 6, 9, 14 drifted from the reference; token 1 is back at it (zero drift, as all the others),
    # so the fourth pick is the first zero-drift token in tiebreak order -- not necessarily 1.
    zero_drift_first = next(t for t in layout.tiebreak[0].tolist() if t not in (6, 9, 14))
    assert chosen == sorted([6, 9, 14, zero_drift_first])


@pytest.mark.parametrize("ranking", ["predicted_error", "reference_drift"])
def test_predicted_error_ranks_a_token_that_keeps_moving_above_one_that_jumped_once(ranking):
    """Budget 2 of 16 tokens, one cluster, no staleness share. In the warm-up tokens 1, 6 and 9
    moved (by 5, 4, 3); the first pruned call recomputes 1 and 6: token 1 has stopped, token 6
    moved 4 again, and token 9 (not recomputed, so its output is the cached one) has gone
    unmeasured for a call. Predicted error ranks by drift rate times calls since refresh:
    token 1 falls to 0.25 of its rate (5), 9 doubles (3 x 2 = 6), so 6 and 9 come next.
    The reference drift sees only token 6 off the capture output (9 shows its cached output)."""
    run = PruningRun(CATSettings(warmup_steps=2, keep_ratio=0.125, num_clusters=1, stale_share=0.0,
                                 ranking=ranking), _info())
    shape, wp = (1, 4, 8, 8), 4
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    for token, amount in ((1, 5.0), (6, 4.0), (9, 3.0)):
        _token_pixels(b, token, wp, amount)
    c = b.clone()
    _token_pixels(c, 6, wp, 4.0)
    _token_pixels(c, 9, wp, 3.0)  # 9 moves on, but its fresh output is not used: it is not selected
    chosen = []
    for out in (a, b, c):
        ctx = run.begin_call(shape, ("c",), "cpu")
        if ctx.index is not None:
            chosen.append(ctx.index[0].tolist())
        run.end_call(ctx, out)
        run.on_step_end(run.step)
    layout = next(iter(run.layouts.values()))
    assert chosen == [[1, 6]]
    if ranking == "predicted_error":
        assert layout.age[0, [1, 6, 9]].tolist() == [0, 0, 1]
        assert layout.drift_rate[0, [1, 6, 9]].tolist() == pytest.approx([0.25 * 20, 16, 12])  # L2 over 4 ch x 4 px
        assert layout.next_index[0].tolist() == [6, 9]
    else:
        first_zero = next(t for t in layout.tiebreak[0].tolist() if t != 6)
        assert layout.next_index[0].tolist() == sorted([6, first_zero])


@pytest.mark.parametrize("pair_cfg", [True, False])
def test_cfg_halves_share_a_selection_only_when_paired(pair_cfg):
    model = model_for("sd3")
    _, stats = _sample(model, batch=2, hw=(16, 16), steps=5, layout="uncond_first",
                       settings=CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=0, num_clusters=4, stale_share=0.25,
                                            pair_cfg=pair_cfg))
    masks = stats.selection_masks[0]  # [pruned calls, 4 rows (uncond img0, img1, cond img0, img1), 8, 8]
    assert masks.shape[:2] == (3, 4)
    paired = all(torch.equal(m[0], m[2]) and torch.equal(m[1], m[3]) for m in masks)
    assert paired == pair_cfg
    # the two images of the batch always get their own selection
    assert any(not torch.equal(m[0], m[1]) for m in masks)


def test_random_selection_baseline_is_exact_at_keep_one_and_saves_otherwise():
    model = model_for("sd35_medium")
    kwargs = dict(batch=1, hw=(12, 14), steps=5, sampler="heun")
    ref, _ = _sample(model, **kwargs)
    out, _ = _sample(model, settings=CATSettings(keep_ratio=1.0, warmup_steps=2, selection="random"), **kwargs)
    assert torch.equal(out, ref)
    out, stats = _sample(model, settings=CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=0, selection="random"), **kwargs)
    assert torch.isfinite(out).all() and stats.ledger.saved_fraction() > 0.2
    for masks in stats.selection_masks:
        assert torch.all(masks.sum(dim=(2, 3)) == CATSettings(keep_ratio=0.3).token_budget(42))


def test_heun_warmup_counts_whole_sampler_steps():
    model = model_for("sd3")
    warmup, steps = 3, 6
    _, stats = _sample(model, batch=1, hw=(16, 16), steps=steps, sampler="heun",
                       settings=CATSettings(keep_ratio=0.5, warmup_steps=warmup, num_clusters=4))
    # Heun: two model calls per sampler step, one in the last step (sigma_next = 0).
    sampler_step = [j // 2 for j in range(2 * steps - 1)]
    modes = [c.mode for c in stats.calls]
    got = list(zip(sampler_step, modes))
    for step, mode in got:
        if step < warmup - 1 or step == steps - 1:  # warm-up, and the default one cool-down step
            assert mode == "dense", got
        elif step == warmup - 1:
            assert mode == "capture", got
        else:
            assert mode == "pruned", got
    assert modes.count("capture") <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keep_one_exact_and_half_size_cache(dtype):
    """Models run in bf16/fp16 under ComfyUI: keep 1.0 stays exact and the caches use 2-byte K/V."""
    model = cat_harness.tiny_model("sd35_medium").to(dtype)
    ctx_t, pooled = (t.to(dtype) for t in cat_harness.random_cond(2, 1))
    options, run = cat_harness.patch_options(model, CATSettings(keep_ratio=1.0, warmup_steps=2))
    x = torch.randn(2, 16, 12, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(4):
            call = run.begin_call(x.shape, ("uncond", "cond"), x.device)
            opts = dict(options)
            opts[CALL_KEY] = call
            t = torch.full((2,), 1000.0 * (1 - step / 4))
            v = model(x.to(dtype), t, context=ctx_t, y=pooled, transformer_options=opts)
            ref = model(x.to(dtype), t, context=ctx_t, y=pooled)
            merged, _ = run.end_call(call, v)
            assert torch.equal(merged, ref.float()), (step, call.mode)
            x = x - 0.1 * merged
            run.on_step_end(step)
    stats = run.finish()
    assert [c.mode for c in stats.calls] == ["dense", "capture", "pruned", "pruned"]
    assert stats.peak_cache_bytes == _hand_cache_bytes("sd35_medium", 2, 2, (12, 14)) // 2


@pytest.mark.parametrize("overrides", [dict(seed=2**63 - 1), dict(cluster_iters=0), dict(feature_scale=0.0),
                                       dict(num_clusters=256), dict(keep_ratio=0.01, stale_share=1.0)])
def test_extreme_settings_run(overrides):
    settings = CATSettings(**{**dict(warmup_steps=2, num_clusters=5), **overrides})
    run = PruningRun(settings, _info())
    modes = _drive(run, (2, 4, 10, 6), ("c",), 5)
    assert [m for _, m in modes][-1] is CallMode.PRUNED
    stats = run.finish()
    budget = settings.token_budget(15)
    assert all(torch.all(m.sum(dim=(2, 3)) == budget) for m in stats.selection_masks)


# ============================================================================ refresh_first_block
def _block_caches_after(model, settings, inputs, timesteps, keys=("uncond", "cond")):
    """One call per (latent, timestep) (warm-up 1: capture, then pruned); returns (run, last call)."""
    options, run = cat_harness.patch_options(model, settings)
    ctx_tokens, pooled = cat_harness.random_cond(inputs[0].shape[0], seed=5)
    with torch.no_grad():
        for step, (x, t) in enumerate(zip(inputs, timesteps)):
            call = run.begin_call(x.shape, keys, "cpu")
            opts = dict(options)
            opts[CALL_KEY] = call
            t = torch.full((x.shape[0],), float(t))
            run.end_call(call, model(x, t, context=ctx_tokens, y=pooled, transformer_options=opts))
            run.on_step_end(step)
    return run, call


@pytest.mark.parametrize("layout", ["sd3", "sd35_medium"])
def test_first_block_keys_are_exact_after_a_pruned_call_and_later_blocks_are_not(layout):
    """With refresh_first_block the pruned call leaves block 0's cache equal to a full computation on
    the same latent (its input is exact for every token); block 1 keeps stale rows for the others."""
    model = model_for(layout, depth=2)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 12, 12, generator=g)
    x1 = x0 + 0.5 * torch.randn(2, 16, 12, 12, generator=g)
    settings = dict(keep_ratio=0.3, warmup_steps=1, num_clusters=4, cluster_iters=2)
    run, call = _block_caches_after(model, CATSettings(**settings), [x0, x1], [900, 700])
    assert call.mode is CallMode.PRUNED
    # A capture of x1 alone computes every token of every block: the ground truth.
    full, full_call = _block_caches_after(model, CATSettings(**settings), [x1], [700])
    assert full_call.mode is CallMode.CAPTURE
    pruned_blocks, full_blocks = call.layout.blocks, full_call.layout.blocks
    names = ("k", "v", "k2", "v2") if layout == "sd35_medium" else ("k", "v")
    for name in names:
        assert torch.equal(getattr(pruned_blocks[0], name), getattr(full_blocks[0], name)), name
    assert not torch.allclose(pruned_blocks[1].k, full_blocks[1].k)
    # Switched off, block 0 keeps stale rows too.
    off, off_call = _block_caches_after(model, CATSettings(**settings, refresh_first_block=False), [x0, x1], [900, 700])
    assert not torch.allclose(off_call.layout.blocks[0].k, full_blocks[0].k)


# ============================================================================ cool-down steps
@pytest.mark.parametrize("sampler,denoise", [("euler", 1.0), ("heun", 1.0), ("euler", 0.6)])
@pytest.mark.parametrize("cooldown", [0, 1, 2])
def test_cooldown_steps_run_in_full_at_the_end(sampler, denoise, cooldown):
    model = model_for("sd3")
    steps, warmup = 7, 2
    _, stats = _sample(model, batch=1, hw=(16, 16), steps=steps, sampler=sampler, denoise=denoise,
                       settings=CATSettings(keep_ratio=0.3, warmup_steps=warmup, cooldown_steps=cooldown, num_clusters=4))
    by_step = {s["step"]: set(s["modes"]) for s in stats.steps()}
    assert sorted(by_step) == list(range(steps))  # denoise 0.6 runs `steps` steps too
    for step, modes in by_step.items():
        assert modes == {_expected_mode(step, warmup, steps, cooldown).value}, (step, modes)
    pruned_steps = steps - warmup - cooldown
    assert sum(s["modes"].count("pruned") > 0 for s in stats.steps()) == pruned_steps


def test_cooldown_covering_the_pruned_steps_leaves_the_run_exact():
    model = model_for("sd35_medium")
    kwargs = dict(batch=1, hw=(12, 14), steps=5)
    ref, _ = _sample(model, **kwargs)
    out, stats = _sample(model, settings=CATSettings(keep_ratio=0.3, warmup_steps=3, cooldown_steps=2), **kwargs)
    assert torch.equal(out, ref)
    assert {c.mode for c in stats.calls} == {"dense"} and stats.ledger.saved_fraction() == 0.0


def test_cooldown_needs_the_step_count_and_costs_what_it_computes():
    """Without start_sampling (a host that cannot tell the step count) the run prunes to the end."""
    shape, keys = (2, 16, 16, 16), ("uncond", "cond")
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=2, num_clusters=4)
    unknown = PruningRun(settings, _info())
    assert [m for _, m in _drive(unknown, shape, keys, steps=6)][-2:] == [CallMode.PRUNED, CallMode.PRUNED]
    known = PruningRun(settings, _info())
    known.start_sampling(6)
    assert [m for _, m in _drive(known, shape, keys, steps=6)] == [_expected_mode(s, 2, 6, 2) for s in range(6)]
    # Two of the four pruned calls became full calls: their MACs count as computed.
    def computed(run):
        return sum(c.tokens_computed for c in run.stats.calls)
    assert computed(known) - computed(unknown) == 2 * (2 * 64 - 2 * settings.token_budget(64))


@pytest.mark.parametrize("pair_cfg", [True, False])
def test_cond_and_uncond_in_separate_calls_share_one_selection(pair_cfg):
    """Calls the host could not batch (prompts of different lengths) are the same image's CFG
    halves: with pair_cfg they recompute the same tokens at every pruned step, and only the
    first layout chooses; without it each chooses its own."""
    model = cat_harness.tiny_model("sd3", seed=5)
    cond, uncond = cat_harness.random_cond(1, 1), cat_harness.random_cond(1, 2)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=0, pair_cfg=pair_cfg)
    out, stats = cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=8, settings=settings, layout="split")
    first, second = stats.selection_masks  # [pruned calls, B, Hp, Wp] per layout
    assert first.shape == second.shape and first.shape[0] == 6
    assert torch.equal(first, second) == pair_cfg
    assert torch.isfinite(out).all()
