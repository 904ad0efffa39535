"""What a pruned call serves for the tokens it did not recompute: each one's cached output,
moved one call on along the change it showed between its last two computations.

A token that is not recomputed keeps the output of its last computation, while the model would
have moved it on. Its output usually keeps moving the way it moved last time, so part of one
call's worth of that change is added to what it is served. Carrying the guess further for
tokens that wait longer was measured worse (README, "Stale outputs moved on"). Everything is
elementwise on [B, C, H, W] latents: no host sync, static shapes.
"""
from __future__ import annotations

import torch


def extrapolated(cached: torch.Tensor, change: torch.Tensor, strength: float) -> torch.Tensor:
    """The output served for a stale token: cached + strength * change (one call's change).

    cached, change [B, C, H, W]; strength in [0, 1] (0 = the cached output as is, the paper's)."""
    return torch.add(cached, change, alpha=strength)


def update_change(change: torch.Tensor, fresh: torch.Tensor, computed: torch.Tensor, cached: torch.Tensor,
                  waited: torch.Tensor) -> None:
    """After a pruned call (in place): each recomputed token's output change per call since its
    previous computation; the other tokens keep the change they had.

    fresh [B, 1, H, W] bool: the recomputed tokens' pixels; computed: this call's output;
    cached: their outputs before this call; waited [B, 1, H, W]: calls since each token's previous
    computation, this call included."""
    change.copy_(torch.where(fresh, (computed - cached) / waited, change))
