"""The part every block adapter shares: how a block call finds its CAT call and which path it takes.

Dense calls (and calls outside a CAT run) run the model's own block; capture and pruned calls run
the adapter's block math, prepared once per run (layers.block_math). Blocks never count MACs: the
first hooked block of a call reads the call's token counts from its arguments (`tokens`), and the
runtime charges the adapter's cost model for them (ModelInfo.cost). An adapter supplies only those
pieces, so the dispatch cannot drift apart between adapters.
"""
from __future__ import annotations

from typing import Callable

from ..runtime import CallMode
from .layers import LayerHost, block_math

#: where the host's per-call options carry the CallContext (ComfyUI: transformer_options)
CALL_KEY = "cat_pruning_call"


def run_block(ctx, index: int, layer_host: LayerHost | None, dense: Callable, tokens: Callable,
              build_math: Callable, pruned: Callable):
    """dense() -> the model's own block; tokens(ctx) -> the call's CallTokens (read by the
    call's first block only); build_math(host) -> the adapter's block math (once per run);
    pruned(math) -> the capture or pruned block."""
    if ctx is not None and ctx.tokens is None:
        ctx.tokens = tokens(ctx)
    if ctx is None or ctx.mode is CallMode.DENSE:
        return dense()
    return pruned(block_math(ctx, index, layer_host, build_math))


def replace_hook(index: int, layer_host: LayerHost | None, tokens: Callable, build_math: Callable, pruned: Callable):
    """A `patches_replace["dit"]` patch: tokens(ctx, args), pruned(args, extra, ctx, math)."""
    def hook(args, extra):
        ctx = args["transformer_options"].get(CALL_KEY)
        return run_block(ctx, index, layer_host, lambda: extra["original_block"](args), lambda c: tokens(c, args),
                         build_math, lambda math: pruned(args, extra, ctx, math))

    hook.cat_block_index = index
    return hook
