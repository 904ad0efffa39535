"""Which image tokens to recompute next: cluster-balanced drift plus a staleness share.

Everything is batched per row ([B, L]) so each image and each CFG half gets its own ranking,
uses only stable sorts (deterministic ties) and keeps a static output shape [B, k].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def drift_scores(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L2 norm per token of the change of its predicted output since the reference step (fp32)."""
    return torch.linalg.vector_norm((current.float() - reference.float()), dim=-1)


def neighbour_max(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """3x3 max-pool on the token grid, so a cluster's rank also reflects its border's drift."""
    b = scores.shape[0]
    pooled = F.max_pool2d(scores.view(b, 1, *grid), kernel_size=3, stride=1, padding=1)
    return pooled.view(b, -1)


def select_tokens(
    scores: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int,
    staleness: torch.Tensor,
    tiebreak: torch.Tensor,
    budget: int,
    stale_share: float,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Return the sorted indices [B, budget] of the tokens to recompute at the next step.

    scores    [B, L] drift of each token's output (larger = changing, refresh it)
    labels    [B, L] fixed k-means cluster of each token
    staleness [B, L] decayed refresh count (smaller = refreshed less recently/often)
    tiebreak  [B, L] a fixed order of token ids that breaks ties (the runtime passes a Hilbert
              curve, so equally stale tokens are refreshed as compact regions)
    """
    b, n = scores.shape
    budget = min(budget, n)
    n_stale = int(round(budget * stale_share))
    n_drift = budget - n_stale

    drift_mask = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    parts = []
    if n_drift > 0:
        drift_idx = _cluster_balanced(scores, labels, num_clusters, tiebreak, n_drift, grid)
        drift_mask.scatter_(1, drift_idx, True)
        parts.append(drift_idx)
    if n_stale > 0:
        # Least refreshed first; tokens already chosen by drift go last so the sets stay disjoint.
        order = _lexsort(tiebreak, [staleness, drift_mask.float()])
        parts.append(order[:, :n_stale])
    chosen = torch.cat(parts, dim=1)
    return chosen.sort(dim=1).values


#: how much of a token's earlier drift rate is kept when it is refreshed again: one step's change
#: is a noisy measure of how fast a token moves
RATE_MEMORY = 0.25


def update_drift_rate(rate: torch.Tensor, age: torch.Tensor, fresh: torch.Tensor, change: torch.Tensor) -> None:
    """After a pruned call (in place): each refreshed token's output change per call since its
    previous refresh, smoothed, and every token's age in calls since its last refresh.

    rate, age [B, L] fp32; fresh [B, L] bool, the tokens this call recomputed; change [B, L] the
    L2 norm of their output's change against the cached output they replace.
    """
    rate.copy_(torch.where(fresh, RATE_MEMORY * rate + (1 - RATE_MEMORY) * change / (age + 1), rate))
    advance_age(age, fresh)


def advance_age(age: torch.Tensor, fresh: torch.Tensor) -> None:
    """After a pruned call (in place): calls since each token's last refresh (0: this call)."""
    age.add_(1)
    age.masked_fill_(fresh, 0)


def predicted_error(rate: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """How far each token's cached output is expected to be off at the next call: it keeps moving
    at its last measured rate, for one call more than its age. Ranking by this, rather than by
    the drift since the capture step, favours tokens that move fast and have not been refreshed
    for a while, and not those that moved once and have been refreshed since."""
    return rate * (age + 1)


def update_staleness(staleness: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Halve every count, then add one refresh to the chosen tokens (in place)."""
    staleness.mul_(0.5)
    staleness.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=staleness.dtype))
    return staleness


def _cluster_balanced(scores, labels, num_clusters, tiebreak, n_pick, grid):
    """Top-drift tokens with per-cluster quotas proportional to the cluster's pooled drift mass.

    A cluster that drifts more gets a larger share, but every cluster's share is capped by its
    quota, so one region cannot take the whole budget while others with drift starve.
    """
    b, n = scores.shape
    k = num_clusters
    s = scores.float()
    pooled = neighbour_max(s, grid)
    ones = torch.ones_like(s)
    counts = torch.zeros(b, k, device=s.device).scatter_add_(1, labels, ones)
    mass = torch.zeros(b, k, device=s.device).scatter_add_(1, labels, pooled)
    # With no drift at all the quotas fall back to cluster size (a spatially even spread).
    mass = mass + 1e-12 * counts
    quota = torch.ceil(n_pick * mass / mass.sum(dim=1, keepdim=True))

    # Rank of each token inside its cluster by drift (0 = largest).
    by_cluster = _lexsort(tiebreak, [-s, labels.float()])
    sorted_labels = labels.gather(1, by_cluster)
    starts = torch.cumsum(counts, dim=1) - counts
    position = torch.arange(n, device=s.device).expand(b, n).float()
    rank_sorted = position - starts.gather(1, sorted_labels)
    rank = torch.empty_like(rank_sorted).scatter_(1, by_cluster, rank_sorted)

    eligible = rank < quota.gather(1, labels)
    order = _lexsort(tiebreak, [-s, -eligible.float()])
    return order[:, :n_pick]


def _lexsort(tiebreak: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """Token ids sorted ascending by keys[-1], then keys[-2], ..., then by tiebreak order."""
    order = tiebreak
    for key in keys:
        _, pos = torch.sort(key.gather(1, order), dim=1, stable=True)
        order = order.gather(1, pos)
    return order
