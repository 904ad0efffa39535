"""Human-readable summaries of a finished run: the text report and token maps as images."""
from __future__ import annotations

import torch

from .runtime import RunStats

# A perceptually ordered ramp (dark blue -> teal -> yellow) for "how often recomputed".
_RAMP = torch.tensor([[0.07, 0.04, 0.33], [0.13, 0.40, 0.56], [0.13, 0.66, 0.52], [0.55, 0.82, 0.27], [0.99, 0.91, 0.15]])


def format_report(stats: RunStats | None) -> str:
    if stats is None:
        return "CAT Pruning: no run recorded yet. Connect the sampler's LATENT output so this node runs after sampling."
    s = stats.settings
    ledger = stats.ledger
    lines = [
        f"CAT Pruning: keep {s['keep_ratio']:.2f}, warm-up {s['warmup_steps']} steps, {s['num_clusters']} clusters, stale share {s['stale_share']:.2f}",
        f"MACs saved: {100 * ledger.saved_fraction():.1f}% ({ledger.total_computed / 1e9:.3f} of {ledger.total_dense / 1e9:.3f} GMACs)",
    ]
    for module in sorted(ledger.dense):
        dense = ledger.dense[module]
        saved = 0.0 if dense == 0 else 1 - ledger.computed[module] / dense
        lines.append(f"  {module}: {100 * saved:.1f}% saved")
    lines.append(f"Cache memory (peak): {stats.peak_cache_bytes / 2**20:.1f} MiB")
    lines.append(f"Sampling wall time: {stats.wall_seconds:.2f} s, {len(stats.calls)} model calls")
    if stats.fallback_reason:
        lines.append(f"Fell back to full compute: {stats.fallback_reason}")
    lines.append("Image tokens computed per step:")
    for step in stats.steps():
        modes = "/".join(sorted(set(step["modes"])))
        lines.append(f"  step {step['step']:3d}: {step['computed']:7d} of {step['total']:7d} ({100 * step['computed'] / max(step['total'], 1):5.1f}%) {modes}")
    return "\n".join(lines)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[B, h, w] in [0, 1] -> [B, h, w, 3] RGB on the ramp."""
    x = values.clamp(0, 1) * (len(_RAMP) - 1)
    lo = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - lo).unsqueeze(-1)
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def refresh_heatmap(stats: RunStats | None, height: int, width: int) -> torch.Tensor:
    """How often each token was recomputed, as an IMAGE batch [B, height, width, 3] (one per row).

    Normalised by the run's number of calls of that layout, so a token recomputed at every call is
    yellow and one never recomputed after warm-up is dark.
    """
    if stats is None or not stats.refresh_maps:
        return torch.zeros(1, height, width, 3)
    maps = max(stats.refresh_maps, key=lambda m: m.numel())
    norm = maps / maps.amax(dim=(1, 2), keepdim=True).clamp(min=1)
    return upscale_nearest(colorize(norm), height, width)


def upscale_nearest(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h, w, C] -> [B, height, width, C] with nearest-neighbour (keeps token edges crisp)."""
    x = image.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="nearest")
    return x.permute(0, 2, 3, 1).contiguous()
