"""cat_core.selection: drift scores, cluster-balanced drift picks, staleness share, update rule."""
from __future__ import annotations

import math

import pytest
import torch

from cat_core.selection import (RATE_MEMORY, drift_scores, neighbour_max, predicted_error, select_tokens,
                                update_drift_rate, update_staleness)
from cat_core.tokens import hilbert_order


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_case(seed, b=2, grid=(6, 7), clusters=5):
    g = _gen(seed)
    n = grid[0] * grid[1]
    scores = torch.rand(b, n, generator=g)
    labels = torch.randint(0, clusters, (b, n), generator=g)
    staleness = torch.rand(b, n, generator=g) * 2
    tiebreak = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    return scores, labels, staleness, tiebreak


def _check_valid(idx, b, k, n):
    assert idx.shape == (b, k)
    assert idx.dtype == torch.int64
    assert torch.all(idx[:, 1:] > idx[:, :-1]), "sorted and unique"
    assert int(idx.min()) >= 0 and int(idx.max()) < n


# ------------------------------------------------------------------------------ scores
def test_drift_scores_is_l2_per_token():
    g = _gen(0)
    cur = torch.randn(2, 10, 6, generator=g).half()
    ref = torch.randn(2, 10, 6, generator=g)
    got = drift_scores(cur, ref)
    assert got.shape == (2, 10) and got.dtype == torch.float32
    for b in range(2):
        for t in range(10):
            d = cur[b, t].float() - ref[b, t]
            assert float(got[b, t]) == pytest.approx(math.sqrt(float((d * d).sum())), rel=1e-5)


@pytest.mark.parametrize("grid", [(4, 5), (1, 7), (3, 1), (1, 1)])
def test_neighbour_max_matches_hand_loop(grid):
    hp, wp = grid
    s = torch.rand(2, hp * wp, generator=_gen(hp * 10 + wp))
    got = neighbour_max(s, grid)
    for b in range(2):
        for r in range(hp):
            for c in range(wp):
                vals = [s[b, rr * wp + cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                        if 0 <= rr < hp and 0 <= cc < wp]
                assert float(got[b, r * wp + c]) == float(max(vals))


# ------------------------------------------------------------------------------ basic shape
@pytest.mark.parametrize("budget", [1, 2, 5, 13, 41])
@pytest.mark.parametrize("stale_share", [0.0, 0.3, 0.75, 1.0])
def test_select_returns_sorted_unique_in_range(budget, stale_share):
    scores, labels, staleness, tiebreak = _random_case(budget)
    idx = select_tokens(scores, labels, 5, staleness, tiebreak, budget, stale_share, (6, 7))
    _check_valid(idx, 2, budget, 42)


@pytest.mark.parametrize("stale_share", [0.0, 0.5, 0.75, 1.0])
def test_full_budget_is_arange(stale_share):
    scores, labels, staleness, tiebreak = _random_case(7)
    idx = select_tokens(scores, labels, 5, staleness, tiebreak, 42, stale_share, (6, 7))
    assert torch.equal(idx, torch.arange(42).expand(2, -1))
    over = select_tokens(scores, labels, 5, staleness, tiebreak, 100, stale_share, (6, 7))
    assert torch.equal(over, torch.arange(42).expand(2, -1))


# ------------------------------------------------------------------------------ drift quotas
def _two_cluster_row():
    """A 1x16 grid: cluster 0 = tokens 0..7, cluster 1 = tokens 8..15."""
    labels = torch.tensor([[0] * 8 + [1] * 8])
    return labels, (1, 16)


def test_one_cluster_with_all_drift_takes_the_drift_budget():
    labels, grid = _two_cluster_row()
    # Drift only inside cluster 0, away from the border (token 7 = 0, so pooling cannot leak into 1).
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.0] + [0.0] * 8])
    staleness = torch.ones(1, 16)
    for tiebreak in (torch.arange(16)[None], torch.arange(16).flip(0)[None]):
        for budget in range(1, 8):
            idx = select_tokens(scores, labels, 2, staleness, tiebreak, budget, 0.0, grid)
            expected = sorted(torch.argsort(scores[0], descending=True)[:budget].tolist())
            assert idx[0].tolist() == expected, budget


def test_drift_mass_split_three_to_one_splits_the_picks():
    labels, grid = _two_cluster_row()
    # Pooled (3x3 max) drift: cluster 0 = 8 tokens x 3.0 = 24, cluster 1 = 8 x 1.0 = 8 -> quotas 6 : 2
    # of a budget of 8, although a plain top-8 would take 7 tokens from cluster 0.
    scores = torch.tensor([[3.0] * 7 + [1.0] + [1.0] * 8])
    staleness = torch.ones(1, 16)
    plain_top = torch.argsort(scores[0], descending=True, stable=True)[:8]
    assert int((plain_top < 7).sum()) == 7  # all seven 3.0 tokens of cluster 0
    idx = select_tokens(scores, labels, 2, staleness, torch.arange(16)[None], 8, 0.0, grid)
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5, 8, 9]  # ties broken in tiebreak order
    rev = select_tokens(scores, labels, 2, staleness, torch.arange(16).flip(0)[None], 8, 0.0, grid)
    assert rev[0].tolist() == [1, 2, 3, 4, 5, 6, 14, 15]
    # Budget 4 -> quotas 3 : 1.
    idx4 = select_tokens(scores, labels, 2, staleness, torch.arange(16)[None], 4, 0.0, grid)
    assert idx4[0].tolist() == [0, 1, 2, 8]


def test_zero_drift_spreads_over_clusters_by_size():
    """No drift at all: quotas fall back to cluster sizes, so every cluster gets picks."""
    grid = (4, 8)
    labels = torch.tensor([[c // 8 for c in range(32)]])  # 4 clusters of 8 (one grid row each)
    tiebreak = torch.randperm(32, generator=_gen(2))[None]
    idx = select_tokens(torch.zeros(1, 32), labels, 4, torch.ones(1, 32), tiebreak, 8, 0.0, grid)
    per_cluster = torch.bincount(labels[0, idx[0]], minlength=4)
    assert per_cluster.tolist() == [2, 2, 2, 2]


def _reference_drift_pick(scores, labels, k, tiebreak, n_pick, grid):
    """Spec of the drift part, in plain Python (one row): pooled-mass quotas, then top drift."""
    hp, wp = grid
    n = hp * wp
    s = scores.tolist()
    pos = {int(t): i for i, t in enumerate(tiebreak.tolist())}
    pooled = []
    for t in range(n):
        r, c = divmod(t, wp)
        pooled.append(max(s[rr * wp + cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                          if 0 <= rr < hp and 0 <= cc < wp))
    lab = labels.tolist()
    counts = [lab.count(c) for c in range(k)]
    mass = [sum(pooled[t] for t in range(n) if lab[t] == c) + 1e-12 * counts[c] for c in range(k)]
    total = sum(mass)
    quota = [math.ceil(n_pick * m / total) for m in mass]
    eligible = set()
    for c in range(k):
        members = sorted((t for t in range(n) if lab[t] == c), key=lambda t: (-s[t], pos[t]))
        eligible.update(members[: quota[c]])
    order = sorted(range(n), key=lambda t: (t not in eligible, -s[t], pos[t]))
    return sorted(order[:n_pick]), quota


@pytest.mark.parametrize("seed", range(12))
def test_drift_part_matches_quota_spec(seed):
    g = _gen(100 + seed)
    grid = [(5, 6), (8, 8), (3, 11), (1, 9)][seed % 4]
    n = grid[0] * grid[1]
    k = [2, 3, 5, 8][seed % 4]
    b = 2
    # Cluster-dependent drift levels so quotas differ a lot between clusters.
    labels = torch.randint(0, k, (b, n), generator=g)
    level = torch.rand(b, k, generator=g) ** 3
    scores = level.gather(1, labels) * torch.rand(b, n, generator=g)
    tiebreak = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    budget = 1 + int(torch.randint(0, n, (1,), generator=g))
    idx = select_tokens(scores, labels, k, torch.ones(b, n), tiebreak, budget, 0.0, grid)
    _check_valid(idx, b, budget, n)
    for row in range(b):
        expected, quota = _reference_drift_pick(scores[row], labels[row], k, tiebreak[row], budget, grid)
        assert idx[row].tolist() == expected
        # Each cluster's share is capped by its quota whenever quotas could fill the budget.
        counts = torch.bincount(labels[row, idx[row]], minlength=k).tolist()
        sizes = torch.bincount(labels[row], minlength=k).tolist()
        if sum(min(q, sz) for q, sz in zip(quota, sizes)) >= budget:
            assert all(cnt <= q for cnt, q in zip(counts, quota)), (counts, quota)


# ------------------------------------------------------------------------------ staleness part
def test_stale_share_one_picks_least_refreshed():
    scores, labels, _, tiebreak = _random_case(3, b=3)
    staleness = torch.rand(3, 42, generator=_gen(33))  # distinct values
    for budget in (1, 4, 10, 30):
        idx = select_tokens(scores, labels, 5, staleness, tiebreak, budget, 1.0, (6, 7))
        for row in range(3):
            assert idx[row].tolist() == sorted(torch.argsort(staleness[row])[:budget].tolist())


def test_stale_ties_follow_tiebreak_order():
    n = 20
    tiebreak = torch.randperm(n, generator=_gen(4))[None]
    staleness = torch.ones(1, n)
    staleness[0, :5] = 0.25  # the five least refreshed come first, then the tiebreak order
    idx = select_tokens(torch.rand(1, n), torch.zeros(1, n, dtype=torch.long), 1, staleness, tiebreak, 8, 1.0, (4, 5))
    rest = [t for t in tiebreak[0].tolist() if t >= 5][:3]
    assert idx[0].tolist() == sorted([0, 1, 2, 3, 4] + rest)


@pytest.mark.parametrize("stale_share", [0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("budget", [4, 9, 20])
def test_drift_and_stale_parts_are_disjoint_and_complete(stale_share, budget):
    scores, labels, staleness, tiebreak = _random_case(int(budget * 10 + stale_share * 100), b=2)
    idx = select_tokens(scores, labels, 5, staleness, tiebreak, budget, stale_share, (6, 7))
    _check_valid(idx, 2, budget, 42)
    n_stale = round(budget * stale_share)
    n_drift = budget - n_stale
    for row in range(2):
        chosen = set(idx[row].tolist())
        drift = set()
        if n_drift:
            drift = set(select_tokens(scores[row:row + 1], labels[row:row + 1], 5, staleness[row:row + 1],
                                      tiebreak[row:row + 1], n_drift, 0.0, (6, 7))[0].tolist())
        assert drift <= chosen
        rest = [t for t in torch.argsort(staleness[row]).tolist() if t not in drift][:n_stale]
        assert chosen == drift | set(rest)


# ------------------------------------------------------------------------------ rows, determinism
def test_rows_are_independent():
    scores, labels, staleness, tiebreak = _random_case(11, b=3)
    together = select_tokens(scores, labels, 5, staleness, tiebreak, 12, 0.5, (6, 7))
    for row in range(3):
        alone = select_tokens(scores[row:row + 1], labels[row:row + 1], 5, staleness[row:row + 1],
                              tiebreak[row:row + 1], 12, 0.5, (6, 7))
        assert torch.equal(together[row:row + 1], alone)
    # Same labels/staleness/tiebreak in every row, different drift: different picks per row.
    same = lambda t: t[:1].expand(3, -1)  # noqa: E731
    diff = select_tokens(scores, same(labels), 5, same(staleness), same(tiebreak), 12, 0.25, (6, 7))
    assert not torch.equal(diff[0], diff[1]) and not torch.equal(diff[1], diff[2])
    for row in range(3):
        alone = select_tokens(scores[row:row + 1], labels[:1], 5, staleness[:1], tiebreak[:1], 12, 0.25, (6, 7))
        assert torch.equal(diff[row], alone[0])


@pytest.mark.parametrize("stale_share", [0.0, 0.5, 1.0])
def test_deterministic_with_all_ties(stale_share):
    n = 42
    labels = torch.randint(0, 5, (2, n), generator=_gen(1))
    tiebreak = torch.randperm(n, generator=_gen(2)).expand(2, -1)
    args = (torch.zeros(2, n), labels, 5, torch.ones(2, n), tiebreak, 10, stale_share, (6, 7))
    a = select_tokens(*args)
    b = select_tokens(*[x.clone() if torch.is_tensor(x) else x for x in args])
    assert torch.equal(a, b)
    _check_valid(a, 2, 10, n)
    if stale_share == 1.0:  # all tied: the first tokens of the tiebreak permutation
        assert a[0].tolist() == sorted(tiebreak[0, :10].tolist())


# ------------------------------------------------------------------------------ update rule
def test_update_staleness_halves_and_adds_one():
    g = _gen(9)
    st = torch.rand(2, 12, generator=g)
    before = st.clone()
    chosen = torch.tensor([[0, 3, 11], [1, 2, 5]])
    out = update_staleness(st, chosen)
    assert out is st  # in place
    for b in range(2):
        for t in range(12):
            expected = before[b, t] / 2 + (1.0 if t in chosen[b].tolist() else 0.0)
            assert float(st[b, t]) == pytest.approx(float(expected))


def test_update_drift_rate_by_hand():
    """A refreshed token's rate is its change per call since its last refresh, blended with its
    earlier rate; every token ages by one call and the refreshed ones restart at zero."""
    rate = torch.tensor([[2.0, 4.0, 6.0, 8.0]])
    age = torch.tensor([[0.0, 2.0, 1.0, 5.0]])
    fresh = torch.tensor([[True, True, False, False]])
    change = torch.tensor([[3.0, 9.0, 100.0, 100.0]])  # changes of tokens not refreshed are ignored
    update_drift_rate(rate, age, fresh, change)
    m = RATE_MEMORY
    assert rate[0].tolist() == pytest.approx([m * 2 + (1 - m) * 3 / 1, m * 4 + (1 - m) * 9 / 3, 6.0, 8.0])
    assert age[0].tolist() == [0.0, 0.0, 2.0, 6.0]
    assert predicted_error(rate, age)[0].tolist() == pytest.approx([float(rate[0, 0]), float(rate[0, 1]), 18.0, 56.0])


@pytest.mark.parametrize("n,k", [(37, 5), (42, 7), (16, 3), (30, 29), (12, 1)])
def test_staleness_round_robin(n, k):
    """Zero drift, stale share 1: every token is refreshed within ceil(L/k)+1 steps, again and again."""
    grid = (1, n)
    g = _gen(n * k)
    labels = torch.randint(0, 4, (1, n), generator=g)
    tiebreak = torch.randperm(n, generator=g)[None]
    staleness = torch.ones(1, n)
    limit = math.ceil(n / k) + 1
    last = [-1] * n
    for step in range(4 * limit):
        idx = select_tokens(torch.zeros(1, n), labels, 4, staleness, tiebreak, k, 1.0, grid)
        _check_valid(idx, 1, k, n)
        update_staleness(staleness, idx)
        for t in idx[0].tolist():
            assert step - last[t] <= limit, (t, step, last[t])
            last[t] = step
        # Nobody has waited `limit` steps without a refresh (first refresh within `limit` steps too).
        assert all(step - s <= limit - 1 for s in last), (step, last)


# ------------------------------------------------------------------------------ Hilbert tie-break
def _grid_steps(order: torch.Tensor, width: int) -> torch.Tensor:
    """Manhattan distance on the grid between consecutive tokens of an order."""
    r, c = order // width, order % width
    return r.diff().abs() + c.diff().abs()


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (4, 4), (16, 16), (64, 64)])
def test_hilbert_order_walks_a_square_grid_one_neighbour_at_a_time(grid):
    order = hilbert_order(grid)
    assert sorted(order.tolist()) == list(range(grid[0] * grid[1]))
    if order.numel() > 1:
        assert _grid_steps(order, grid[1]).max() == 1


@pytest.mark.parametrize("grid", [(3, 5), (16, 24), (45, 80), (1, 7)])
def test_hilbert_order_of_any_grid_is_a_permutation_that_stays_local(grid):
    order = hilbert_order(grid)
    assert sorted(order.tolist()) == list(range(grid[0] * grid[1]))
    # Consecutive tokens are neighbours on average (row-major order would jump a whole row at every line end).
    assert _grid_steps(order, grid[1]).float().mean() < 1.5


def test_equally_stale_tokens_are_taken_as_one_compact_region():
    """All staleness equal (the first pruned step): the stale picks follow the curve, a compact block."""
    grid, n = (16, 16), 256
    tiebreak = hilbert_order(grid)[None]
    idx = select_tokens(torch.zeros(1, n), torch.zeros(1, n, dtype=torch.long), 1, torch.ones(1, n), tiebreak, 64, 1.0, grid)
    rows, cols = idx[0] // 16, idx[0] % 16
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == 64  # exactly one 8 x 8 quadrant
    random_order = torch.randperm(n, generator=_gen(0))[None]
    spread = select_tokens(torch.zeros(1, n), torch.zeros(1, n, dtype=torch.long), 1, torch.ones(1, n), random_order, 64, 1.0, grid)
    assert (spread[0] // 16).unique().numel() > 8
