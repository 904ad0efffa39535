"""cat_core.report: the text report and the refresh heat map."""
from __future__ import annotations

import re

import pytest
import torch

from cat_core import CATSettings, RunStats
from cat_core.accounting import MacLedger
from cat_core.report import colorize, format_report, refresh_heatmap, upscale_nearest
from cat_core.runtime import CallRecord
from tests import cat_harness


@pytest.fixture(scope="module")
def real_stats():
    model = cat_harness.tiny_model("sd3", depth=2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 16, 20, generator=g)
    _, stats = cat_harness.sample(model, cond=cat_harness.random_cond(1, 1), uncond=cat_harness.random_cond(1, 2),
                                  noise=noise, steps=6, sampler="heun", layout="uncond_first",
                                  settings=CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=5))
    return stats


def _luma(rgb):
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


# ------------------------------------------------------------------------------ text report
def test_report_without_run():
    text = format_report(None)
    assert "no run" in text.lower()


def test_report_mentions_macs_saved_and_settings(real_stats):
    text = format_report(real_stats)
    ledger = real_stats.ledger
    expected = 100 * (1 - sum(ledger.computed.values()) / sum(ledger.dense.values()))
    m = re.search(r"MACs saved: ([0-9.]+)%", text)
    assert m, text
    assert float(m.group(1)) == pytest.approx(expected, abs=0.051)
    assert expected > 10  # this run did save something
    assert len(real_stats.calls) == 11  # heun, 6 steps: 2 evaluations per step but the last
    assert "keep 0.30" in text and "warm-up 2" in text and "5 clusters" in text
    for module in ledger.dense:
        assert re.search(rf"{module}: [0-9.]+% saved", text), module
    assert "Fell back" not in text


def test_report_has_one_line_per_step(real_stats):
    text = format_report(real_stats)
    lines = re.findall(r"step\s+(\d+):\s+(\d+) of\s+(\d+)", text)
    # Per step, summed independently from the call records.
    per_step = {}
    for c in real_stats.calls:
        comp, tot = per_step.get(c.step, (0, 0))
        per_step[c.step] = (comp + c.tokens_computed, tot + c.tokens_total)
    assert [(int(s), int(a), int(b)) for s, a, b in lines] == [(s, *per_step[s]) for s in sorted(per_step)]
    assert len(lines) == 6
    assert "pruned" in text and "dense" in text and "capture" in text


def test_report_shows_fallback_reason():
    stats = RunStats(settings=CATSettings().as_dict(), fallback_reason="RuntimeError: out of memory")
    stats.calls.append(CallRecord(step=0, mode="dense", rows=2, tokens_computed=128, tokens_total=128))
    stats.ledger.add("joint_blocks", 100, 100)
    text = format_report(stats)
    assert "RuntimeError: out of memory" in text
    assert "MACs saved: 0.0%" in text
    assert re.search(r"step\s+0:\s+128 of\s+128", text)


def test_report_handles_empty_stats():
    text = format_report(RunStats(settings=CATSettings().as_dict(), ledger=MacLedger()))
    assert "MACs saved: 0.0%" in text


# ------------------------------------------------------------------------------ heat map
def test_heatmap_without_stats_is_black():
    for stats in (None, RunStats(settings={})):
        img = refresh_heatmap(stats, 8, 12)
        assert img.shape == (1, 8, 12, 3) and torch.all(img == 0)


def test_heatmap_is_brightest_where_refreshed_most():
    counts = torch.tensor([
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]],
        [[11.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 0.0]],
    ])
    stats = RunStats(settings={}, refresh_maps=[counts])
    img = refresh_heatmap(stats, 6, 8)  # 2x nearest upscale of the 3x4 token grid
    assert img.shape == (2, 6, 8, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    luma = _luma(img)
    for b in range(2):
        token_luma = luma[b, ::2, ::2]  # one pixel per token
        hot = int(counts[b].argmax())
        assert int(token_luma.argmax()) == hot
        flat_c, flat_l = counts[b].reshape(-1), token_luma.reshape(-1)
        for i in range(flat_c.numel()):  # brighter exactly where refreshed more
            for j in range(flat_c.numel()):
                if flat_c[i] > flat_c[j]:
                    assert flat_l[i] > flat_l[j]
                elif flat_c[i] == flat_c[j]:
                    assert flat_l[i] == flat_l[j]
        # nearest-neighbour upscale: each token covers a constant 2x2 block
        assert torch.equal(img[b, 0::2, 0::2], img[b, 1::2, 1::2])


def test_heatmap_survives_all_zero_maps():
    zero = refresh_heatmap(RunStats(settings={}, refresh_maps=[torch.zeros(1, 3, 3)]), 3, 3)
    assert zero.shape == (1, 3, 3, 3)
    assert torch.isfinite(zero).all() and torch.allclose(zero, zero[0, 0, 0].expand_as(zero))


def test_heatmap_from_a_real_run(real_stats):
    assert len(real_stats.refresh_maps) == 1
    maps = real_stats.refresh_maps[0]  # [2 rows (uncond, cond), 8, 10]
    img = refresh_heatmap(real_stats, 32, 40)
    assert img.shape == (2, 32, 40, 3)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    for row in range(2):
        counts = maps[row]
        assert counts.max() > counts.min()  # pruning made the refresh counts uneven
        luma = _luma(img)[row, ::4, ::4]
        assert luma.shape == counts.shape
        assert float(luma[counts == counts.max()].min()) > float(luma[counts == counts.min()].max())


def test_colorize_and_upscale():
    ends = colorize(torch.tensor([[[0.0, 1.0, -3.0, 7.0]]]))
    assert ends.shape == (1, 1, 4, 3)
    assert torch.equal(ends[0, 0, 0], ends[0, 0, 2]) and torch.equal(ends[0, 0, 1], ends[0, 0, 3])
    ramp = _luma(colorize(torch.linspace(0, 1, 50).view(1, 1, 50)))[0, 0]
    assert torch.all(ramp[1:] > ramp[:-1])  # perceptually ordered: brighter with the value
    x = torch.arange(6.0).view(1, 2, 3, 1)
    up = upscale_nearest(x, 4, 9)
    assert up.shape == (1, 4, 9, 1)
    for r in range(4):
        for c in range(9):
            assert float(up[0, r, c, 0]) == float(x[0, r // 2, c // 3, 0])


def test_heatmap_shows_the_largest_layout():
    small = torch.zeros(1, 2, 2)
    small[0, 0, 0] = 9.0
    big = torch.zeros(1, 4, 4)
    big[0, 1, 2] = 5.0
    for maps in ([small, big], [big, small]):
        img = refresh_heatmap(RunStats(settings={}, refresh_maps=maps), 4, 4)
        assert img.shape == (1, 4, 4, 3)
        luma = _luma(img)[0]
        assert int(luma.argmax()) == 1 * 4 + 2 and int((luma == luma.max()).sum()) == 1


def test_heatmap_aligns_tokens_of_odd_latents():
    """Latent 25x30 -> 13x15 tokens of 16x16 image pixels (VAE x8, patch 2) on a 200x240 image: every
    pixel shows the token that covers it; the padded last row/column is cropped."""
    counts = torch.arange(13 * 15, dtype=torch.float32).view(1, 13, 15)
    img = refresh_heatmap(RunStats(settings={}, refresh_maps=[counts]), 200, 240, token_px=16)
    assert img.shape == (1, 200, 240, 3)
    expected = colorize(counts / counts.max())
    for y in range(0, 200, 7):
        for x in range(0, 240, 11):
            assert torch.allclose(img[0, y, x], expected[0, y // 16, x // 16]), (y, x)
