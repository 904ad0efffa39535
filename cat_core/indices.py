"""The index sets a pruned call gathers its computed tokens with and scatters them back with.

Every block of a pruned call computes the same tokens, so each index set (the selection; the
selection past a fixed prefix such as text tokens, with the prefix and an always-computed suffix
such as reference tokens) is built once per call, and so is its expanded view for each tensor
shape it meets: a block adds gathers and scatters, never index work. One `CallIndices` per
CallContext (`ctx.indices`): a captured graph records the ops that build them from the layout's
selection buffer, so a replay rebuilds them from the new selection without any Python running.
"""
from __future__ import annotations

import torch


class IndexSet:
    """[B, n] positions along one token dim of [B, L, ...] tensors, with its expanded views."""

    def __init__(self, index: torch.Tensor):
        self.index = index
        self._views: dict = {}
        self._shared: dict = {}

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def expand(self, like: torch.Tensor, dim: int) -> torch.Tensor:
        """The index broadcast to gather / scatter `like` along `dim` (every other dim full)."""
        key = (dim, like.dim(), tuple(s for d, s in enumerate(like.shape) if d not in (0, dim)))
        view = self._views.get(key)
        if view is None:
            b, n = self.index.shape
            shape, ones = list(like.shape), [1] * like.dim()
            shape[0], shape[dim] = ones[0], ones[dim] = b, n
            view = self._views[key] = self.index.view(ones).expand(shape)
        return view

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The set's rows of t along dim (a batch-1 t, e.g. rotary rows, serves every batch row)."""
        if t.shape[0] != self.index.shape[0]:
            t = t.expand(self.index.shape[0], *t.shape[1:])
        return torch.gather(t, dim, self.expand(t, dim))

    def gather_shared(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """gather for a tensor every block of the call gets (the rotary rows): once per call."""
        key = (id(t), dim)
        hit = self._shared.get(key)
        if hit is None or hit[0] is not t:
            hit = self._shared[key] = (t, self.gather(t, dim))
        return hit[1]

    def scatter_back(self, dest: torch.Tensor, dim: int, src: torch.Tensor) -> torch.Tensor:
        """Write src's rows into dest in place, at the set's positions along dim; returns dest."""
        return dest.scatter_(dim, self.expand(dest, dim), src)

    def gather_queries(self, mask, seq_len: int):
        """The computed query rows of an attention mask ([q, k], [b, q, k] or [b, h, q, k]);
        None, or a mask broadcast over queries, as it is."""
        if mask is None or mask.dim() < 2 or mask.shape[-2] != seq_len:
            return mask
        m = mask.unsqueeze(0) if mask.dim() == 2 else mask
        return self.gather(m, m.dim() - 2)


class CallIndices:
    """The index sets of one pruned call, built on first use and shared by all its blocks."""

    def __init__(self, selection: torch.Tensor | None):
        self._selection = selection
        self._sets: dict = {}

    def selection(self, offset: int = 0) -> IndexSet:
        """The selected main-image tokens, at `offset` (e.g. past the text rows of a joint cache)."""
        key = ("selection", offset)
        found = self._sets.get(key)
        if found is None:
            sel = self._selection
            if sel is None:
                raise ValueError("this call has no selection (it is not a pruned call)")
            found = self._sets[key] = IndexSet(sel if offset == 0 else sel + offset)
        return found

    def computed(self, prefix: int, n_main: int, suffix: int = 0) -> IndexSet:
        """The computed tokens of a sequence [prefix | main (n_main) | suffix]: every prefix token
        (text), the selected main tokens, every suffix token (reference images)."""
        if not prefix and not suffix:
            return self.selection()
        key = ("computed", prefix, n_main, suffix)
        found = self._sets.get(key)
        if found is None:
            sel = self.selection(prefix).index
            b, device = sel.shape[0], sel.device
            parts = [torch.arange(prefix, device=device).expand(b, -1)] if prefix else []
            parts.append(sel)
            if suffix:
                parts.append(torch.arange(prefix + n_main, prefix + n_main + suffix, device=device).expand(b, -1))
            found = self._sets[key] = IndexSet(torch.cat(parts, dim=1))
        return found
