"""cat_core.report visuals: staleness, clusters, selection strip, UI summary and compare (host-free).

Most tests use hand-made RunStats whose selections are known, so every pixel can be predicted;
one cross-checks the maps of a real (reference-MMDiT) run against its own selection masks.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cat_core import CATSettings, RunStats
from cat_core.accounting import MacLedger
from cat_core.report import (
    GAP_RGB,
    SELECTED_RGB,
    UNSELECTED_RGB,
    CompareError,
    calls_since_refresh,
    cluster_map,
    cluster_palette,
    colorize,
    compare_images,
    format_report,
    grid_to_image,
    refresh_heatmap,
    selection_strip,
    selection_tile_scale,
    staleness_map,
    stats_summary,
)
from cat_core.runtime import CallRecord
from cat_core.selection import update_staleness
from tests import cat_harness


def _luma(rgb):
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


# ------------------------------------------------------------------------------ hand-made run
GRID = (3, 4)
ROWS = 2
# Pruned calls: the token ids (row-major on the 3x4 grid) recomputed per model row.
SELECTIONS = [
    [[0, 1, 2], [11, 10, 9]],
    [[0, 5, 6], [11, 4, 3]],
    [[0, 1, 7], [11, 8, 2]],
    [[0, 5, 2], [11, 10, 9]],
]
LABELS = torch.tensor([
    [[0, 0, 1, 1], [0, 2, 2, 1], [3, 3, 2, 1]],
    [[4, 4, 4, 4], [0, 0, 1, 1], [5, 5, 5, 5]],
])


def _hand_made_stats() -> RunStats:
    """One layout (2 rows, 3x4 tokens): capture call, then the pruned calls of SELECTIONS."""
    n = GRID[0] * GRID[1]
    refresh = torch.ones(ROWS, n)  # the capture call recomputed everything
    staleness = torch.ones(ROWS, n)
    masks = []
    for chosen in SELECTIONS:
        index = torch.tensor(chosen)
        mask = torch.zeros(ROWS, n, dtype=torch.bool).scatter_(1, index, True)
        masks.append(mask)
        refresh.scatter_add_(1, index, torch.ones_like(index, dtype=refresh.dtype))
        update_staleness(staleness, index)
    stats = RunStats(settings=CATSettings(keep_ratio=0.25, warmup_steps=2, num_clusters=6).as_dict())
    shape = (ROWS, *GRID)
    stats.refresh_maps.append(refresh.view(shape))
    stats.staleness_maps.append(staleness.view(shape))
    stats.cluster_maps.append(LABELS.clone())
    stats.selection_masks.append(torch.stack(masks).view(-1, *shape))
    stats.calls += [CallRecord(0, "dense", ROWS, ROWS * n, ROWS * n), CallRecord(1, "capture", ROWS, ROWS * n, ROWS * n)]
    stats.calls += [CallRecord(2 + i, "pruned", ROWS, ROWS * 3, ROWS * n) for i in range(len(SELECTIONS))]
    stats.ledger.add("joint_blocks", 600, 1200)
    stats.ledger.add("embed_and_final", 100, 100)
    stats.peak_cache_bytes = 3 * 2**20
    stats.wall_seconds = 1.5
    return stats


def _expected_calls_since() -> torch.Tensor:
    n = GRID[0] * GRID[1]
    last = torch.full((ROWS, n), -1)
    for i, chosen in enumerate(SELECTIONS):
        for r in range(ROWS):
            last[r, chosen[r]] = i
    return (len(SELECTIONS) - 1 - last).view(ROWS, *GRID)  # never chosen: counted from the capture call


@pytest.fixture
def stats():
    return _hand_made_stats()


# ------------------------------------------------------------------------------ heat map
def test_heatmap_brightest_exactly_where_refreshed_most(stats):
    img = refresh_heatmap(stats, 3 * 16, 4 * 16)
    assert img.shape == (ROWS, 48, 64, 3)
    counts = stats.refresh_maps[0]
    luma = _luma(img)[:, ::16, ::16]
    for r in range(ROWS):
        hottest = counts[r] == counts[r].max()
        assert torch.equal(luma[r] == luma[r].max(), hottest)
        assert torch.allclose(img[r, 0, 0], colorize(torch.ones(1, 1, 1))[0, 0, 0]) == bool(hottest[0, 0])


# ------------------------------------------------------------------------------ staleness
def test_calls_since_refresh_decodes_the_runtime_counts(stats):
    assert torch.equal(calls_since_refresh(stats.staleness_maps[0]), _expected_calls_since())
    # a fresh capture (all ones) and long decays
    assert torch.equal(calls_since_refresh(torch.ones(1, 2, 2)), torch.zeros(1, 2, 2, dtype=torch.int64))
    s = torch.ones(1, 5)
    for k in range(1, 41):
        update_staleness(s, torch.tensor([[0]]))
        assert calls_since_refresh(s).tolist() == [[0, k, k, k, k]]


def test_staleness_map_is_brightest_where_least_recently_recomputed(stats):
    img = staleness_map(stats, 48, 64)
    assert img.shape == (ROWS, 48, 64, 3)
    since = _expected_calls_since()
    luma = _luma(img)[:, ::16, ::16]
    dark = colorize(torch.zeros(1, 1, 1))[0, 0, 0]
    for r in range(ROWS):
        flat_s, flat_l = since[r].reshape(-1), luma[r].reshape(-1)
        for i in range(flat_s.numel()):
            for j in range(flat_s.numel()):
                if flat_s[i] > flat_s[j]:
                    assert flat_l[i] > flat_l[j]
                elif flat_s[i] == flat_s[j]:
                    assert flat_l[i] == flat_l[j]
        # recomputed at the last call -> the ramp's dark end
        last = torch.tensor(SELECTIONS[-1][r])
        for t in last.tolist():
            assert torch.allclose(img[r, (t // 4) * 16, (t % 4) * 16], dark)
    # each token is a constant 16x16 block
    assert torch.equal(img[:, 0::16, 0::16], img[:, 15::16, 15::16])


# ------------------------------------------------------------------------------ clusters
def test_cluster_map_gives_each_label_its_own_colour(stats):
    img = cluster_map(stats, 48, 64)
    assert img.shape == (ROWS, 48, 64, 3)
    tokens = img[:, ::16, ::16].reshape(-1, 3)
    labels = LABELS.reshape(-1)
    colour_of = {}
    for label, colour in zip(labels.tolist(), tokens):
        key = tuple(round(float(c), 6) for c in colour)
        assert colour_of.setdefault(label, key) == key  # one colour per label
    assert len(set(colour_of.values())) == len(colour_of)  # distinct labels, distinct colours
    assert torch.equal(img[:, 0::16, 0::16], img[:, 15::16, 15::16])


def test_cluster_palette_is_distinct_and_visible():
    pal = cluster_palette(256)
    assert pal.shape == (256, 3)
    assert float(pal.min()) >= 0 and float(pal.max()) <= 1
    assert len({tuple(round(float(c), 4) for c in row) for row in pal}) == 256
    # neighbours in label order are far apart (no two adjacent clusters look alike)
    assert float((pal[1:] - pal[:-1]).abs().sum(dim=1).min()) > 0.15
    assert float(pal.max(dim=1).values.min()) > 0.69  # none is dark (black means "no data")


# ------------------------------------------------------------------------------ selection strip
def test_selection_strip_has_one_tile_per_pruned_call_white_at_selected_tokens(stats):
    strip = selection_strip(stats, tile_px=96, columns=3, gap=2)
    f = selection_tile_scale(GRID, 96)
    assert f == 24
    th, tw = GRID[0] * f, GRID[1] * f
    calls = len(SELECTIONS)
    cols, nrows = 3, 2
    assert strip.shape == (ROWS, 2 + nrows * (th + 2), 2 + cols * (tw + 2), 3)
    white, dark, grey = torch.tensor(SELECTED_RGB), torch.tensor(UNSELECTED_RGB), torch.tensor(GAP_RGB)
    covered = torch.zeros(strip.shape[1:3], dtype=torch.bool)
    for i in range(calls):
        y, x = 2 + (i // cols) * (th + 2), 2 + (i % cols) * (tw + 2)
        covered[y:y + th, x:x + tw] = True
        for r in range(ROWS):
            tile = strip[r, y:y + th, x:x + tw]
            is_white = (tile == white).all(-1)
            expected = torch.zeros(GRID[0] * GRID[1], dtype=torch.bool)
            expected[SELECTIONS[i][r]] = True
            expected = expected.view(GRID).repeat_interleave(f, 0).repeat_interleave(f, 1)
            assert torch.equal(is_white, expected), (i, r)
            assert (tile[~expected] == dark).all()
    # everything else (gaps, the unused 6th cell) is grey: exactly `calls` tiles
    assert (strip[:, ~covered] == grey).all()
    assert int((strip == white).all(-1).sum()) == ROWS * calls * 3 * f * f


def test_selection_strip_default_layout_and_no_pruning():
    stats = _hand_made_stats()
    strip = selection_strip(stats)
    assert strip.shape[0] == ROWS and strip.shape[1] == 2 + 3 * 24 + 2  # 4 calls fit one row
    assert torch.equal(selection_strip(None), torch.zeros(1, 64, 64, 3))
    empty = RunStats(settings={}, refresh_maps=[torch.ones(1, 2, 2)])
    assert selection_strip(empty).shape == (1, 64, 64, 3)
    for fn in (staleness_map, cluster_map, refresh_heatmap):
        assert torch.equal(fn(empty if fn is not refresh_heatmap else None, 16, 24), torch.zeros(1, 16, 24, 3))


# ------------------------------------------------------------------------------ alignment and layout choice
def test_odd_latents_keep_tokens_aligned():
    # latent 5x7 -> grid 3x4 (padded), image 40x56: tokens are 16 px, the last row/col cropped
    grid = torch.arange(12.0).view(1, 3, 4, 1)
    img = grid_to_image(grid, 40, 56, token_px=16)
    assert img.shape == (1, 40, 56, 1)
    for y in range(40):
        for x in range(56):
            assert float(img[0, y, x, 0]) == float(grid[0, y // 16, x // 16, 0])
    for fn in (refresh_heatmap, staleness_map, cluster_map):  # the maps pass token_px through
        img = fn(_hand_made_stats(), 40, 56, token_px=16)
        assert torch.equal(img[:, 32:40, 48:56], img[:, 32:33, 48:49].expand(-1, 8, 8, -1))
        assert not torch.equal(img[:, 31, 48], img[:, 32, 48]) or not torch.equal(img[:, 32, 47], img[:, 32, 48])
    # without token_px: the smallest covering block; sizes that fit no block: nearest neighbour
    assert torch.equal(grid_to_image(grid, 6, 8), grid.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert grid_to_image(grid, 4, 5).shape == (1, 4, 5, 1)
    assert grid_to_image(grid, 40, 56, token_px=4).shape == (1, 40, 56, 1)


def test_maps_follow_the_layout_the_heatmap_shows():
    stats = _hand_made_stats()
    small = RunStats(settings={})
    # a smaller layout before the big one, with its own maps
    stats.refresh_maps.insert(0, torch.full((1, 2, 2), 9.0))
    stats.staleness_maps.insert(0, torch.ones(1, 2, 2))
    stats.cluster_maps.insert(0, torch.zeros(1, 2, 2, dtype=torch.long))
    stats.selection_masks.insert(0, torch.ones(7, 1, 2, 2, dtype=torch.bool))
    for fn in (refresh_heatmap, staleness_map, cluster_map):
        assert fn(stats, 48, 64).shape == (ROWS, 48, 64, 3)
    assert selection_strip(stats, columns=8).shape[0] == ROWS
    assert stats_summary(stats)["pruned_calls"] == len(SELECTIONS)
    assert stats_summary(small)["grid"] is None


# ------------------------------------------------------------------------------ UI summary
def test_stats_summary_is_strict_json_with_the_headline_numbers(stats):
    summary = stats_summary(stats)
    text = json.dumps(summary, allow_nan=False)  # what the browser's JSON.parse accepts
    back = json.loads(text)
    assert back["has_run"] is True
    assert back["macs_saved"] == pytest.approx(1 - 700 / 1300)
    assert back["speedup_estimate"] == pytest.approx(1300 / 700)
    assert back["peak_cache_mib"] == pytest.approx(3.0)
    assert back["wall_seconds"] == pytest.approx(1.5)
    assert back["pruned_calls"] == len(SELECTIONS) and back["rows"] == ROWS and back["grid"] == list(GRID)
    assert [s["mode"] for s in back["steps"]] == ["dense", "capture"] + ["pruned"] * len(SELECTIONS)
    assert [s["computed"] for s in back["steps"]] == [24, 24] + [6] * len(SELECTIONS)
    assert back["steps"][-1]["fraction"] == pytest.approx(0.25)
    assert {m["name"]: m["saved"] for m in back["modules"]} == pytest.approx({"joint_blocks": 0.5, "embed_and_final": 0.0})
    assert back["settings"]["keep_ratio"] == 0.25
    assert back["notes"] == []
    noted = RunStats(settings={}, ledger=MacLedger(), notes=["not pruned: sampler uni_pc extrapolates"])
    assert json.loads(json.dumps(stats_summary(noted)))["notes"] == ["not pruned: sampler uni_pc extrapolates"]
    assert stats_summary(None) == {"has_run": False, "steps": []}
    empty = stats_summary(RunStats(settings={}, ledger=MacLedger()))
    assert empty["speedup_estimate"] is None
    json.dumps(empty, allow_nan=False)
    assert "Speed-up estimate from MACs: 1.86x" in format_report(stats)


# ------------------------------------------------------------------------------ compare
def _numpy_psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        mse = np.mean((x - y) ** 2)
        out.append(math.inf if mse == 0 else 10 * math.log10(1.0 / mse))
    return out


def test_compare_psnr_matches_numpy_and_the_difference_is_amplified():
    g = torch.Generator().manual_seed(0)
    unpatched = torch.rand(3, 24, 32, 3, generator=g)
    patched = (unpatched + 0.05 * torch.randn(3, 24, 32, 3, generator=g)).clamp(0, 1)
    patched[2] = unpatched[2]  # an identical pair
    report, diff, summary = compare_images(patched, unpatched, amplify=4.0)
    expected = _numpy_psnr(patched.numpy(), unpatched.numpy())
    assert summary["psnr"][:2] == pytest.approx(expected[:2], rel=1e-5)
    assert summary["psnr"][2] is None and summary["identical"] == [False, False, True]
    assert summary["psnr_mean"] == pytest.approx((expected[0] + expected[1] + 100.0) / 3, rel=1e-5)
    assert summary["ssim"][2] == pytest.approx(1.0) and 0 < summary["ssim"][0] < 1
    json.dumps(summary, allow_nan=False)
    for i in range(2):
        assert f"image {i + 1}: PSNR {expected[i]:.2f} dB" in report
    assert "image 3: identical" in report and "Mean: PSNR" in report
    assert diff.shape == patched.shape
    want = np.clip(np.abs(patched.numpy() - unpatched.numpy()) * 4.0, 0, 1)
    assert np.allclose(diff.numpy(), want, atol=1e-6)
    assert float(diff[2].abs().max()) == 0.0


def test_compare_refuses_different_sizes_clearly():
    a = torch.zeros(1, 64, 64, 3)
    for b in (torch.zeros(1, 64, 48, 3), torch.zeros(2, 64, 64, 3), torch.zeros(1, 64, 64, 4)):
        with pytest.raises(CompareError, match="differ in size"):
            compare_images(a, b)
    with pytest.raises(CompareError, match=r"\[B, H, W, C\]"):
        compare_images(torch.zeros(64, 64, 3), torch.zeros(64, 64, 3))
    _, _, small = compare_images(torch.rand(1, 5, 6, 3), torch.rand(1, 5, 6, 3))  # smaller than the SSIM window
    assert small["ssim"][0] is not None


# ------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def real_stats():
    model = cat_harness.tiny_model("sd35_medium", depth=2)
    noise = torch.randn(1, 16, 16, 20, generator=torch.Generator().manual_seed(0))
    _, stats = cat_harness.sample(model, cond=cat_harness.random_cond(1, 1), uncond=cat_harness.random_cond(1, 2),
                                  noise=noise, steps=7, settings=CATSettings(keep_ratio=0.3, warmup_steps=2, cooldown_steps=0, num_clusters=5))
    return stats


def test_real_run_maps_agree_with_its_selections(real_stats):
    masks = real_stats.selection_masks[0]  # [calls, B, Hp, Wp]
    calls, rows, hp, wp = masks.shape
    assert (calls, rows, hp, wp) == (5, 2, 8, 10)
    last = torch.full((rows, hp, wp), -1)
    for i in range(calls):
        last[masks[i]] = i
    assert torch.equal(calls_since_refresh(real_stats.staleness_maps[0]), calls - 1 - last)
    strip = selection_strip(real_stats, tile_px=40, columns=8, gap=2)
    f = selection_tile_scale((hp, wp), 40)
    assert strip.shape == (rows, 2 + hp * f + 2, 2 + calls * (wp * f + 2), 3)
    white = torch.tensor(SELECTED_RGB)
    for i in range(calls):
        x = 2 + i * (wp * f + 2)
        tile = strip[:, 2:2 + hp * f, x:x + wp * f]
        assert torch.equal((tile[:, ::f, ::f] == white).all(-1), masks[i])
    clusters = cluster_map(real_stats, 128, 160)
    assert clusters.shape == (rows, 128, 160, 3)
    labels = real_stats.cluster_maps[0]
    assert len({tuple(c.tolist()) for c in clusters[:, ::16, ::16].reshape(-1, 3)}) == int(labels.unique().numel())
    summary = stats_summary(real_stats)
    json.dumps(summary, allow_nan=False)
    assert summary["pruned_calls"] == calls and 0 < summary["macs_saved"] < 1
    assert len(summary["steps"]) == 7
