"""One model call under CAT: begin, run, merge, fall back on error.

The one protocol the ComfyUI wrapper (nodes/patch.py) and the host-free test harness both use,
so host-free tests exercise the code users run. The host supplies how to run its model:

    run_model(ctx, hooks) -> denoised
        ctx: the CallContext the block hooks read (None: no CAT context, the blocks run as the
        model's own); hooks: False to run without CAT's block hooks at all.

and, for graph replay of pruned calls (the `execution` setting), a cat_core.graph.GraphCall (or
a function making one, called only for the pruned calls that may replay): the call's per-call
inputs and how to run the model on static copies of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from contextvars import ContextVar
from typing import Callable

import torch

from . import graph as graph_replay
from .runtime import PruningRun
from .schedule import CallMode

log = logging.getLogger("CAT Pruning")

RunModel = Callable[[object, bool], torch.Tensor]

#: The CallContext of the model call in progress, for blocks the host gives no per-call options
#: (adapters that reach their blocks through object patches read it; dit hooks read the options).
ACTIVE_CALL: ContextVar = ContextVar("cat_pruning_active_call", default=None)


@contextlib.contextmanager
def _active(ctx):
    token = ACTIVE_CALL.set(ctx)
    try:
        yield
    finally:
        ACTIVE_CALL.reset(token)


def _sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def cached_quantity(run: PruningRun, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """What the output cache holds: the x0 prediction, or the velocity (flow: denoised = x - sigma * v)."""
    if run.cache_space == "denoised":
        return denoised
    return (x - denoised) / _sigma(sigma, denoised).clamp(min=1e-8)


def model_call(run: PruningRun, x: torch.Tensor, sigma: torch.Tensor, chunk_keys, context_shape, run_model: RunModel,
               passthrough: tuple = (), graph: "graph_replay.GraphCall | Callable | None" = None) -> torch.Tensor:
    """The denoised prediction of one model call: recomputed tokens fresh, the others from the cache.

    passthrough: exception types that must reach the host unchanged (its interrupt); any other
    error in a pruned or capture call ends pruning for the rest of the run and recomputes this call
    without CAT, with one log line. graph: lets pruned calls be replayed (cat_core/graph.py).
    """
    if x.dim() == 5:  # [B, C, T, H, W] (Qwen-Image, video-latent image models)
        return _frames_call(run, x, sigma, chunk_keys, context_shape, run_model, passthrough, graph)
    ctx = run.begin_call(x.shape, tuple(chunk_keys), x.device, context_shape, x=x)
    if ctx.mode is CallMode.REUSE:
        # Step reuse: no model run, every token's output from the cache.
        cached, _ = run.end_call(ctx, None)
        # a new tensor: the cache is written in place by the next computed call
        return _from_cache(run, x, sigma, cached).to(dtype=x.dtype, copy=run.cache_space == "denoised")
    if run.can_skip_hooks(ctx):
        # Warm-up and cool-down calls: the model's own blocks, without CAT's hooks in between.
        ctx.hooks_skipped = True
        denoised = run_model(None, False)
        run.end_call(ctx, cached_quantity(run, x, sigma, denoised))
        return denoised
    try:
        with _active(ctx):
            if ctx.mode is CallMode.PRUNED and run.settings.execution != "eager":
                denoised = _pruned_call(run, ctx, x, run_model, graph, passthrough)
            else:
                denoised = run_model(ctx, True)
    except passthrough:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of ours must not cost the user the image
        if ctx.mode is CallMode.DENSE:
            raise
        log.warning("CAT Pruning: %s in a pruned step (%s); finishing this run without pruning.", type(error).__name__, error)
        run.disable(f"{type(error).__name__}: {error}")
        return run_model(None, True)
    merged, fresh = run.end_call(ctx, cached_quantity(run, x, sigma, denoised))
    if fresh is None:
        return denoised
    return torch.where(fresh, denoised, _from_cache(run, x, sigma, merged))


def _pruned_call(run: PruningRun, ctx, x: torch.Tensor, run_model: RunModel, graph, passthrough: tuple) -> torch.Tensor:
    """A pruned call through the graph replay layer (made at the run's first pruned call)."""
    if graph is None:
        if run.settings.execution == "graph":
            run.note_unpruned("graph replay not used: this host gives no static inputs for its model calls; pruned calls ran eager")
        return run_model(ctx, True)
    if run.graph is None:
        run.graph = graph_replay.GraphReplay(run.settings.execution, run.note_unpruned)
    if run.graph.off is not None:  # graphs are off for the rest of the run: no replay inputs to build
        return run.graph.eager(lambda: run_model(ctx, True))
    graph = _resolve(graph)

    def run_active(call_ctx, inputs):  # a replay layer's own context (capture) is the active one too
        with _active(call_ctx):
            return graph.run(call_ctx, inputs)

    return run.graph.call(ctx, dataclasses.replace(graph, run=run_active), x.device, lambda: run_model(ctx, True), passthrough)


def _resolve(graph) -> "graph_replay.GraphCall":
    return graph() if callable(graph) else graph


def _from_cache(run: PruningRun, x: torch.Tensor, sigma: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """The denoised prediction that a cached output stands for at this call's x and sigma."""
    if run.cache_space == "denoised":
        return cached.to(x.dtype)
    return x - _sigma(sigma, x) * cached


def _frames_call(run: PruningRun, x, sigma, chunk_keys, context_shape, run_model: RunModel, passthrough: tuple, graph=None):
    """A 5-D latent: one frame (T = 1) is an image, bookkept as [B, C, H, W] and returned in the
    host's shape; several frames have no 2-D token grid here, so the call runs unpruned."""
    if x.shape[2] != 1:
        run.note_unpruned(f"model calls on latents with {x.shape[2]} frames ran unpruned (one-frame latents only)")
        return run_model(None, False)

    def one_frame(out: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            raise ValueError(f"model output {tuple(out.shape)} does not match the latent {tuple(x.shape)}")
        return out.squeeze(2)

    def run_frame(ctx, hooks: bool) -> torch.Tensor:
        return one_frame(run_model(ctx, hooks))

    if graph is not None:
        def graph(inner=graph):
            made = _resolve(inner)
            return dataclasses.replace(made, run=lambda ctx, inputs, run=made.run: one_frame(run(ctx, inputs)))
    return model_call(run, x.squeeze(2), sigma, chunk_keys, context_shape, run_frame, passthrough, graph).unsqueeze(2)
