"""Human-readable summaries of a finished run: the text report, token maps as images, a
JSON-able summary for the frontend widget, and the patched-vs-unpatched comparison.

Everything here is plain torch (no ComfyUI import). IMAGE tensors follow ComfyUI's layout:
[B, H, W, 3] float32 in [0, 1].
"""
from __future__ import annotations

import math

import torch

from .metrics import finite_mean, psnr, ssim
from .runtime import RunStats

# A perceptually ordered ramp (dark blue -> teal -> yellow) for "how often recomputed".
_RAMP = torch.tensor([[0.07, 0.04, 0.33], [0.13, 0.40, 0.56], [0.13, 0.66, 0.52], [0.55, 0.82, 0.27], [0.99, 0.91, 0.15]])


def _warmup_text(stats: RunStats) -> str:
    setting, used = stats.settings["warmup_steps"], getattr(stats, "warmup_used", None)
    if setting != 0:
        return f"{setting} steps"
    return "automatic" if used is None else f"{used} steps (automatic)"


def _reuse_text(stats: RunStats) -> str | None:
    reused = sum(c.mode == "reuse" for c in stats.calls)
    threshold = getattr(stats, "reuse_used", 0.0) or stats.settings.get("reuse_threshold")
    if not threshold:
        return None
    return (f"Step reuse {threshold:g}: {reused} of {len(stats.calls)} model calls taken from the cache "
            "(step reuse replaces token pruning: keep_ratio is not used)")


def format_report(stats: RunStats | None) -> str:
    if stats is None:
        return "CAT Pruning: no run recorded yet. Connect the sampler's LATENT output so this node runs after sampling."
    s = stats.settings
    ledger = stats.ledger
    lines = [
        f"CAT Pruning: keep {s['keep_ratio']:.2f}, warm-up {_warmup_text(stats)}, cool-down {s.get('cooldown_steps', 0)}, "
        f"{s['num_clusters']} clusters, stale share {s['stale_share']:.2f}",
        f"MACs saved: {100 * ledger.saved_fraction():.1f}% ({ledger.total_computed / 1e9:.3f} of {ledger.total_dense / 1e9:.3f} GMACs)",
    ]
    reuse = _reuse_text(stats)
    if reuse:
        lines.append(reuse)
    speedup = speedup_estimate(stats)
    if speedup is not None:
        lines.append(f"Speed-up estimate from MACs: {speedup:.2f}x (an upper bound; measured wall time is below)")
    for module in sorted(ledger.dense):
        dense = ledger.dense[module]
        saved = 0.0 if dense == 0 else 1 - ledger.computed[module] / dense
        lines.append(f"  {module}: {100 * saved:.1f}% saved")
    lines.append(f"Cache memory (peak): {stats.peak_cache_bytes / 2**20:.1f} MiB")
    math = getattr(stats, "block_math", None)
    if math:
        modules = ", ".join(f"{name} x{count}" for name, count in math["module_layers"].items())
        lines.append(f"Pruned blocks' math: lean in {math['lean_blocks']} of {math['blocks']} blocks"
                     + (f"; layers called as modules (cast, patched or unknown to the lean path): {modules}" if modules else ""))
    execution = getattr(stats, "execution", None)
    if execution and execution.get("captures"):
        lines.append(f"Graph replay: {execution['replayed']} pruned calls replayed from {execution['captures']} captures "
                     f"(execution {execution['setting']})")
    lines.append(f"Sampling wall time: {stats.wall_seconds:.2f} s, {len(stats.calls)} model calls")
    if stats.fallback_reason:
        lines.append(f"Fell back to full compute: {stats.fallback_reason}")
    lines.extend(f"Note: {note}" for note in getattr(stats, "notes", ()) if note != stats.fallback_reason)
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


def refresh_heatmap(stats: RunStats | None, height: int, width: int, token_px: int | None = None) -> torch.Tensor:
    """How often each token was recomputed, as an IMAGE batch [B, height, width, 3] (one per row).

    Normalised by the row's most refreshed token (in practice the run's number of calls of that
    layout), so a token recomputed at every call is yellow and one never recomputed after warm-up
    is dark.
    """
    maps = _shown_layout(stats, "refresh_maps")
    if maps is None:
        return torch.zeros(1, height, width, 3)
    maps = maps.float()
    norm = maps / maps.amax(dim=(1, 2), keepdim=True).clamp(min=1)
    return grid_to_image(colorize(norm), height, width, token_px)


def upscale_nearest(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h, w, C] -> [B, height, width, C] with nearest-neighbour (keeps token edges crisp)."""
    x = image.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="nearest")
    return x.permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------ layout choice
def _shown_layout(stats: RunStats | None, name: str):
    """The per-layout map `name` of the layout that the images show.

    That is the layout with the largest refresh map (the first one on ties, as the heatmap has
    always done); the other lists are matched to it by their [B, Hp, Wp] shape, because layouts
    that never got past warm-up have a refresh map but no staleness, clusters or selections.
    """
    if stats is None:
        return None
    entries = getattr(stats, name)
    if not entries:
        return None
    if stats.refresh_maps:
        chosen = max(stats.refresh_maps, key=lambda m: m.numel())
        if name == "refresh_maps":
            return chosen
        for entry in entries:
            if tuple(entry.shape[-3:]) == tuple(chosen.shape[-3:]):
                return entry
    return max(entries, key=lambda m: m.shape[-3:].numel())


def grid_to_image(image: torch.Tensor, height: int, width: int, token_px: int | None = None) -> torch.Tensor:
    """[B, h, w, C] token-grid image -> [B, height, width, C], aligned with the latent's tokens.

    `token_px` is the size of one token in image pixels (8 x the patch size for SD3's VAE). When
    the grid at that size covers the image with less than one token of overhang (what odd latent
    sizes give: the models pad the last patch at the bottom/right), every token becomes a constant
    block and the overhang is cropped. Without `token_px`, the smallest block size that covers the
    image is used the same way; sizes that fit neither are resized nearest-neighbour.
    """
    h, w = image.shape[1:3]
    fh, fw = (token_px, token_px) if token_px else (-(-height // h), -(-width // w))
    if 0 <= fh * h - height < fh and 0 <= fw * w - width < fw:
        out = image.repeat_interleave(fh, dim=1).repeat_interleave(fw, dim=2)
        return out[:, :height, :width].contiguous()
    return upscale_nearest(image, height, width)


# ------------------------------------------------------------------------------ staleness
def calls_since_refresh(staleness: torch.Tensor) -> torch.Tensor:
    """Pruned calls since each token was last recomputed, from the runtime's staleness counts.

    The runtime halves every count at each pruned call and adds 1 to the recomputed tokens,
    starting from 1 at the capture call. A token last recomputed k calls ago therefore holds a
    value in [2^-k, 2^(1-k)), so k = ceil(-log2(value)) (0 for the last call and for capture
    without any pruned call since).
    """
    v = staleness.double().clamp(min=1e-300)
    return torch.ceil(-torch.log2(v)).clamp(min=0).to(torch.int64)


def staleness_map(stats: RunStats | None, height: int, width: int, token_px: int | None = None) -> torch.Tensor:
    """Staleness at the end of the run as an IMAGE batch [B, height, width, 3] (one per row).

    Bright yellow = recomputed longest ago (the row's maximum), dark = recomputed at the last call.
    Black when the run never reached the pruned steps.
    """
    maps = _shown_layout(stats, "staleness_maps")
    if maps is None:
        return torch.zeros(1, height, width, 3)
    since = calls_since_refresh(maps).float()
    norm = since / since.amax(dim=(1, 2), keepdim=True).clamp(min=1)
    return grid_to_image(colorize(norm), height, width, token_px)


# ------------------------------------------------------------------------------ clusters
def cluster_palette(count: int) -> torch.Tensor:
    """[count, 3] distinct RGB colours: golden-ratio hue steps, alternating saturation/value."""
    i = torch.arange(count, dtype=torch.float64)
    hue = torch.remainder(i * 0.6180339887498949, 1.0)
    sat = 0.55 + 0.2 * torch.remainder(i, 3)
    val = 0.95 - 0.25 * torch.remainder(torch.div(i, 3, rounding_mode="floor"), 2)
    h6 = hue * 6
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    sector = sector.long() % 6
    choices = torch.stack([
        torch.stack([val, t, p], -1), torch.stack([q, val, p], -1), torch.stack([p, val, t], -1),
        torch.stack([p, q, val], -1), torch.stack([t, p, val], -1), torch.stack([val, p, q], -1),
    ])  # [6, count, 3]
    return choices[sector, torch.arange(count)].float()


def cluster_map(stats: RunStats | None, height: int, width: int, token_px: int | None = None) -> torch.Tensor:
    """The k-means cluster of each token as an IMAGE batch [B, height, width, 3], one colour per label."""
    labels = _shown_layout(stats, "cluster_maps")
    if labels is None:
        return torch.zeros(1, height, width, 3)
    labels = labels.long().clamp(min=0)
    palette = cluster_palette(int(labels.max()) + 1)
    return grid_to_image(palette[labels], height, width, token_px)


# ------------------------------------------------------------------------------ selections
SELECTED_RGB = (1.0, 1.0, 1.0)
UNSELECTED_RGB = (0.08, 0.08, 0.10)
GAP_RGB = (0.35, 0.35, 0.38)


def selection_tile_scale(grid: tuple[int, int], tile_px: int = 96) -> int:
    """Pixels per token in the strip: tiles about `tile_px` on their longer side (at least 1)."""
    return max(1, tile_px // max(grid))


def selection_strip(stats: RunStats | None, tile_px: int = 96, columns: int = 8, gap: int = 2) -> torch.Tensor:
    """Per-pruned-call selection masks as a contact sheet, one IMAGE per model row [B, h, w, 3].

    Tile i (the i-th pruned call, in call order) sits at column i % columns, row i // columns,
    with its top-left pixel at (gap + row * (tile_h + gap), gap + col * (tile_w + gap)); each
    token is a block of `selection_tile_scale(grid, tile_px)` pixels: white where the token was
    recomputed at that call, dark where its cache was reused. Gaps and unused cells are grey.
    """
    masks = _shown_layout(stats, "selection_masks")
    if masks is None or masks.shape[0] == 0:
        return torch.zeros(1, 64, 64, 3)
    calls, rows, hp, wp = masks.shape
    f = selection_tile_scale((hp, wp), tile_px)
    th, tw = hp * f, wp * f
    cols = max(1, min(columns, calls))
    nrows = -(-calls // cols)
    sheet_h, sheet_w = gap + nrows * (th + gap), gap + cols * (tw + gap)
    sheet = torch.tensor(GAP_RGB).expand(rows, sheet_h, sheet_w, 3).clone()
    on, off = torch.tensor(SELECTED_RGB), torch.tensor(UNSELECTED_RGB)
    tiles = torch.where(masks.bool().unsqueeze(-1), on, off)  # [calls, B, hp, wp, 3]
    tiles = tiles.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    for i in range(calls):
        y, x = gap + (i // cols) * (th + gap), gap + (i % cols) * (tw + gap)
        sheet[:, y:y + th, x:x + tw] = tiles[i]
    return sheet


# ------------------------------------------------------------------------------ summary for the UI
def speedup_estimate(stats: RunStats | None) -> float | None:
    """Dense MACs over computed MACs: what the run would gain if time followed MACs (upper bound)."""
    if stats is None or stats.ledger.total_computed <= 0 or stats.ledger.total_dense <= 0:
        return None
    return stats.ledger.total_dense / stats.ledger.total_computed


def stats_summary(stats: RunStats | None) -> dict:
    """A JSON-able dict of the run for the frontend widget (numbers only, no tensors, no inf/NaN)."""
    if stats is None:
        return {"has_run": False, "steps": []}
    ledger = stats.ledger
    steps = []
    for step in stats.steps():
        modes = sorted(set(step["modes"]))
        mode = "pruned" if "pruned" in modes else "capture" if "capture" in modes else modes[0] if modes else "dense"
        steps.append({
            "step": int(step["step"]), "calls": int(step["calls"]),
            "computed": int(step["computed"]), "total": int(step["total"]),
            "fraction": _finite(step["computed"] / max(step["total"], 1)), "mode": mode,
        })
    modules = []
    for module in sorted(ledger.dense):
        dense = ledger.dense[module]
        modules.append({"name": module, "saved": _finite(0.0 if dense == 0 else 1 - ledger.computed[module] / dense)})
    refresh = _shown_layout(stats, "refresh_maps")
    masks = _shown_layout(stats, "selection_masks")
    settings = {k: v for k, v in (stats.settings or {}).items() if isinstance(v, (int, float, str, bool))}
    return {
        "has_run": True,
        "settings": {k: (_finite(v) if isinstance(v, float) else v) for k, v in settings.items()},
        "macs_saved": _finite(ledger.saved_fraction()),
        "gmacs_computed": _finite(ledger.total_computed / 1e9),
        "gmacs_dense": _finite(ledger.total_dense / 1e9),
        "speedup_estimate": _finite(speedup_estimate(stats)),
        "modules": modules,
        "peak_cache_mib": _finite(stats.peak_cache_bytes / 2**20),
        "wall_seconds": _finite(stats.wall_seconds),
        "calls": len(stats.calls),
        "warmup_used": getattr(stats, "warmup_used", None),
        "reuse_used": _finite(getattr(stats, "reuse_used", 0.0)),
        "reused_calls": sum(c.mode == "reuse" for c in stats.calls),
        "pruned_calls": int(masks.shape[0]) if masks is not None else 0,
        "rows": int(refresh.shape[0]) if refresh is not None else 0,
        "grid": [int(refresh.shape[1]), int(refresh.shape[2])] if refresh is not None else None,
        "fallback_reason": stats.fallback_reason,
        "notes": [str(note) for note in getattr(stats, "notes", ())],
        "steps": steps,
    }


def _finite(value):
    """float, or None for None / inf / NaN (strict JSON parsers such as the browser's reject them)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------ compare
class CompareError(ValueError):
    """The two images cannot be compared (the message says why)."""


def compare_images(patched: torch.Tensor, unpatched: torch.Tensor, amplify: float = 8.0):
    """PSNR / SSIM of each patched image against the unpatched one of the same seed.

    Returns (report text, difference IMAGE [B, H, W, C] = |patched - unpatched| * amplify clipped
    to [0, 1], JSON-able summary). Raises CompareError when the two batches differ in shape.
    """
    if patched.dim() != 4 or unpatched.dim() != 4:
        raise CompareError(f"expected IMAGE batches [B, H, W, C], got {tuple(patched.shape)} and {tuple(unpatched.shape)}")
    if patched.shape != unpatched.shape:
        p, u = patched.shape, unpatched.shape
        raise CompareError(
            f"the images differ in size: patched is {p[0]} x {p[2]}x{p[1]} (batch x WxH, {p[3]} channels), "
            f"unpatched is {u[0]} x {u[2]}x{u[1]} ({u[3]} channels). Compare the outputs of two samplers "
            "with the same latent size, batch and seed."
        )
    a, b = patched.float().cpu(), unpatched.float().cpu()
    n, height, width, _ = a.shape
    window = min(11, height, width)
    window -= 1 - window % 2  # odd
    p_vals = [float(v) for v in psnr(a, b)]
    s_vals = [float(v) for v in ssim(a, b, window=window)]
    diff = ((a - b).abs() * float(amplify)).clamp(0, 1)
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    lines = [f"CAT Compare: patched vs unpatched, {n} image{'s' if n != 1 else ''} of {width}x{height}"]
    for i, (pv, sv) in enumerate(zip(p_vals, s_vals)):
        shown = "identical (PSNR inf)" if math.isinf(pv) and pv > 0 else f"PSNR {pv:.2f} dB"
        lines.append(f"  image {i + 1}: {shown}, SSIM {sv:.4f}")
    psnr_mean, ssim_mean = finite_mean(p_vals), (sum(s_vals) / len(s_vals) if s_vals else math.nan)
    note = " (identical images count as 100 dB)" if any(math.isinf(v) for v in p_vals) else ""
    lines.append(f"Mean: PSNR {psnr_mean:.2f} dB, SSIM {ssim_mean:.4f}{note}")
    lines.append(f"Difference image: |patched - unpatched| x {float(amplify):g} (max abs difference {max_abs:.4f})")
    summary = {
        "images": n, "width": width, "height": height,
        "psnr": [_finite(v) for v in p_vals], "ssim": [_finite(v) for v in s_vals],
        "identical": [math.isinf(v) and v > 0 for v in p_vals],
        "psnr_mean": _finite(psnr_mean), "ssim_mean": _finite(ssim_mean),
        "max_abs_diff": _finite(max_abs), "amplify": float(amplify),
    }
    return "\n".join(lines), diff, summary
