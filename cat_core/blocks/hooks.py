"""The part every block adapter shares: how a block call finds its CAT call and which path it takes.

Dense calls (and calls outside a CAT run) run the model's own block and charge its MACs; capture
and pruned calls run the adapter's block math, prepared once per run (layers.block_math). An
adapter supplies only those three pieces, so the dispatch cannot drift apart between adapters.
"""
from __future__ import annotations

from typing import Callable

from ..runtime import CallMode
from .layers import LayerHost, block_math

#: where the host's per-call options carry the CallContext (ComfyUI: transformer_options)
CALL_KEY = "cat_pruning_call"


def run_block(ctx, index: int, layer_host: LayerHost | None, dense: Callable, count_dense: Callable,
              build_math: Callable, pruned: Callable):
    """dense() -> the model's own block; count_dense(ctx) charges its MACs; build_math(host) ->
    the adapter's block math (once per run); pruned(math) -> the capture or pruned block."""
    if ctx is None or ctx.mode is CallMode.DENSE:
        if ctx is not None:
            count_dense(ctx)
        return dense()
    return pruned(block_math(ctx, index, layer_host, build_math))


def replace_hook(index: int, layer_host: LayerHost | None, count_dense: Callable, build_math: Callable, pruned: Callable):
    """A `patches_replace["dit"]` patch: count_dense(ctx, args), pruned(args, extra, ctx, math)."""
    def hook(args, extra):
        ctx = args["transformer_options"].get(CALL_KEY)
        return run_block(ctx, index, layer_host, lambda: extra["original_block"](args), lambda c: count_dense(c, args),
                         build_math, lambda math: pruned(args, extra, ctx, math))

    hook.cat_block_index = index
    return hook
