"""Mapping between a latent image and the transformer's row-major patch tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_grid(latent_h: int, latent_w: int, patch: int) -> tuple[int, int]:
    """Patch-grid size; odd latents are padded up to the patch, as the models do."""
    return -(-latent_h // patch), -(-latent_w // patch)


def latent_to_tokens(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*p*p], token r*Wp + c holding the patch's values."""
    b, c, h, w = latent.shape
    hp, wp = token_grid(h, w, patch)
    pad_h, pad_w = hp * patch - h, wp * patch - w
    if pad_h or pad_w:
        latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="replicate")
    x = latent.reshape(b, c, hp, patch, wp, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * patch * patch)


def token_mask_to_latent(mask: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """[B, L] bool -> [B, 1, H, W] bool covering each token's latent pixels."""
    return token_values_to_latent(mask, grid, latent_hw, patch)


def token_values_to_latent(values: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """[B, L] -> [B, 1, H, W]: each token's value on every latent pixel of its patch."""
    hp, wp = grid
    m = values.view(values.shape[0], 1, hp, 1, wp, 1).expand(-1, -1, -1, patch, -1, patch)
    m = m.reshape(values.shape[0], 1, hp * patch, wp * patch)
    return m[:, :, : latent_hw[0], : latent_hw[1]]


def grid_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    """[L, 2] normalised (row, col) of each token, for spatially coherent clusters."""
    hp, wp = grid
    rows = torch.arange(hp, device=device, dtype=torch.float32) / max(hp, 1)
    cols = torch.arange(wp, device=device, dtype=torch.float32) / max(wp, 1)
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)


def hilbert_order(grid: tuple[int, int]) -> torch.Tensor:
    """[L] token ids along a Hilbert curve over the grid (row-major ids, any grid size).

    Used to break ties among equally stale tokens: consecutive picks then form compact
    regions, so a recomputed token's neighbours (which it attends to most) are recomputed
    with it instead of being served from stale caches. On a 2^n square grid consecutive
    tokens are 4-neighbours; other grids use the curve of the enclosing 2^n square.
    """
    hp, wp = grid
    side = 1
    while side < max(hp, wp):
        side *= 2
    y = torch.arange(hp).view(-1, 1).expand(hp, wp).reshape(-1)
    x = torch.arange(wp).view(1, -1).expand(hp, wp).reshape(-1)
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = ((x & s) > 0).long()
        ry = ((y & s) > 0).long()
        d += s * s * ((3 * rx) ^ ry)
        # Rotate the quadrant so the curve stays continuous.
        flip = (ry == 0) & (rx == 1)
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ry == 0
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return torch.argsort(d)
