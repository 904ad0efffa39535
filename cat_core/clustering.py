"""Batched, deterministic k-means on the model's device (no host syncs, fixed iteration count)."""
from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, num_clusters: int, iters: int, seed: int = 0, starts: int = 4) -> torch.Tensor:
    """Cluster each row of `points` [B, N, F] independently; returns labels [B, N] (int64).

    Farthest-point initialisation from `starts` seed-chosen start points, all refined at once as
    extra batch rows; each row keeps its lowest-inertia result. A single farthest-point start
    can merge two groups and split another; a few starts avoid that at little cost, since this
    runs once per sampling run. Depends only on the data and the seed (no RNG state).
    """
    b, n, f = points.shape
    k = max(1, min(num_clusters, n))
    starts = max(1, min(starts, n))
    pts = points.float().repeat(starts, 1, 1)  # [starts * B, N, F], start j at rows j*B .. j*B+B-1
    first = torch.tensor([(seed + j * n // starts) % n for j in range(starts)], device=pts.device).repeat_interleave(b)
    labels = _lloyd(pts, _farthest_point_init(pts, k, first), iters)
    cost = inertia(pts, labels, k).view(starts, b)
    best = cost.argmin(dim=0)  # [B]
    return labels.view(starts, b, n).gather(0, best.view(1, b, 1).expand(1, b, n)).squeeze(0)


def _lloyd(pts: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    b, _, _ = pts.shape
    k = centroids.shape[1]
    for _ in range(iters):
        labels = torch.cdist(pts, centroids).argmin(dim=-1)
        sums = torch.zeros_like(centroids).scatter_add_(1, labels.unsqueeze(-1).expand_as(pts), pts)
        counts = torch.zeros(b, k, device=pts.device, dtype=pts.dtype).scatter_add_(1, labels, torch.ones_like(labels, dtype=pts.dtype))
        # An emptied cluster keeps its centroid instead of collapsing to the origin.
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
    return torch.cdist(pts, centroids).argmin(dim=-1)


def _farthest_point_init(pts: torch.Tensor, k: int, first: torch.Tensor) -> torch.Tensor:
    b, n, f = pts.shape
    start = first.view(b, 1)
    chosen = [pts.gather(1, start.unsqueeze(-1).expand(b, 1, f))]
    dist = torch.cdist(pts, chosen[0]).squeeze(-1)
    for _ in range(1, k):
        nxt = dist.argmax(dim=1, keepdim=True)
        c = pts.gather(1, nxt.unsqueeze(-1).expand(b, 1, f))
        chosen.append(c)
        dist = torch.minimum(dist, torch.cdist(pts, c).squeeze(-1))
    return torch.cat(chosen, dim=1)


def inertia(points: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Sum of squared distances to cluster means per row [B]; used to compare against references."""
    pts = points.float()
    b, n, f = pts.shape
    sums = torch.zeros(b, num_clusters, f, device=pts.device).scatter_add_(1, labels.unsqueeze(-1).expand_as(pts), pts)
    counts = torch.zeros(b, num_clusters, device=pts.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=pts.dtype))
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return ((pts - means.gather(1, labels.unsqueeze(-1).expand_as(pts))) ** 2).sum(dim=(1, 2))
