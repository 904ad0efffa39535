"""The per-call index sets (cat_core/indices.py): built once, views cached, gather / scatter-back exact."""
from __future__ import annotations

import pytest
import torch

from cat_core.indices import CallIndices, IndexSet
from cat_core.runtime import CallContext
from cat_core.schedule import CallMode

SEL = torch.tensor([[4, 0, 7], [2, 5, 1]])  # [B=2, k=3] selected main tokens


def _loop_gather(t, index, dim):
    """out[b, ..., j, ...] = t[b, ..., index[b, j], ...], by hand."""
    b_t = t if t.shape[0] == index.shape[0] else t.expand(index.shape[0], *t.shape[1:])
    out = []
    for b in range(index.shape[0]):
        out.append(torch.stack([b_t[b].select(dim - 1, int(i)) for i in index[b]], dim=dim - 1))
    return torch.stack(out)


def _loop_scatter(dest, index, dim, src):
    out = dest.clone()
    for b in range(index.shape[0]):
        for j, i in enumerate(index[b]):
            out[b].select(dim - 1, int(i)).copy_(src[b].select(dim - 1, j))
    return out


def test_selection_offset_and_computed_sets():
    ind = CallIndices(SEL)
    assert torch.equal(ind.selection().index, SEL) and ind.selection().index is SEL  # no copy
    assert torch.equal(ind.selection(10).index, SEL + 10)
    # [text 3 | main 8 | reference 2]
    seq = ind.computed(3, 8, 2).index
    expected = torch.tensor([[0, 1, 2, 7, 3, 10, 11, 12], [0, 1, 2, 5, 8, 4, 11, 12]])
    assert torch.equal(seq, expected)
    # the image stream [main 8 | reference 2]: no prefix
    assert torch.equal(ind.computed(0, 8, 2).index, torch.tensor([[4, 0, 7, 8, 9], [2, 5, 1, 8, 9]]))
    # text only, no reference
    assert torch.equal(ind.computed(3, 8).index, torch.tensor([[0, 1, 2, 7, 3, 10], [0, 1, 2, 5, 8, 4]]))
    # nothing around the selection: the selection itself
    assert ind.computed(0, 8, 0) is ind.selection()


def test_sets_are_built_once_per_call():
    ind = CallIndices(SEL)
    assert ind.selection(5) is ind.selection(5)
    assert ind.computed(3, 8, 2) is ind.computed(3, 8, 2)
    assert ind.computed(3, 8, 2) is not ind.computed(3, 8, 1)
    # one CallIndices per call context, made at first use from the (final) selection
    ctx = CallContext(CallMode.PRUNED, None, SEL)
    ctx.index = SEL.flip(1)
    assert ctx.indices is ctx.indices and torch.equal(ctx.indices.selection().index, SEL.flip(1))
    assert CallContext(CallMode.PRUNED, None, SEL).indices is not ctx.indices


def test_no_selection_is_refused():
    with pytest.raises(ValueError, match="no selection"):
        CallIndices(None).selection()


def test_expanded_views_are_cached_per_shape_and_dim():
    s = IndexSet(SEL)
    a = torch.zeros(2, 9, 4)
    v = s.expand(a, 1)
    assert v.shape == (2, 3, 4) and v.data_ptr() == SEL.data_ptr()  # a view, no copy
    assert s.expand(torch.ones(2, 20, 4), 1) is v  # the length of the token dim does not matter
    assert s.expand(a, 1) is v
    assert s.expand(torch.zeros(2, 9, 5), 1) is not v
    w = s.expand(torch.zeros(2, 6, 9, 8), 2)  # [B, H, L, Dh] along dim 2
    assert w.shape == (2, 6, 3, 8) and w is not v and s.expand(torch.zeros(2, 6, 11, 8), 2) is w
    square = torch.zeros(2, 9, 9)  # the same other dims, along another dim: another view
    assert s.expand(square, 1).shape == (2, 3, 9) and s.expand(square, 2).shape == (2, 9, 3)


@pytest.mark.parametrize("shape, dim", [((2, 9, 4), 1), ((2, 3, 9, 5), 2), ((1, 2, 9, 6), 2)])
def test_gather_and_scatter_back_match_a_loop(shape, dim):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g)
    s = IndexSet(SEL)
    got = s.gather(t, dim)
    assert torch.equal(got, _loop_gather(t, SEL, dim))
    dest = torch.randn(2, *shape[1:], generator=g)
    src = torch.randn(got.shape, generator=g)
    expected = _loop_scatter(dest, SEL, dim, src)
    out = s.scatter_back(dest, dim, src)
    assert out is dest and torch.equal(dest, expected)  # in place
    # the roundtrip: what was scattered back gathers out again
    assert torch.equal(s.gather(dest, dim), src)


def test_shared_gather_runs_once_per_tensor():
    s = IndexSet(SEL)
    pe = torch.randn(1, 1, 9, 4)
    first = s.gather_shared(pe, 2)
    assert s.gather_shared(pe, 2) is first and torch.equal(first, _loop_gather(pe, SEL, 2))
    other = pe.clone()
    assert s.gather_shared(other, 2) is not first


def test_query_rows_of_a_mask():
    s = IndexSet(SEL)
    m = torch.randn(9, 9)
    assert torch.equal(s.gather_queries(m, 9), _loop_gather(m.unsqueeze(0), SEL, 1))
    m4 = torch.randn(2, 3, 9, 9)
    assert torch.equal(s.gather_queries(m4, 9), _loop_gather(m4, SEL, 2))
    over_keys = torch.randn(1, 1, 9)  # a bias over keys holds for any queries
    assert s.gather_queries(over_keys, 9) is over_keys and s.gather_queries(None, 9) is None
