"""How a pruned block calls its layers: the lean way, or through the host's modules.

A host layer module (ComfyUI's ops) does Python bookkeeping on every call: an interrupt check
under a lock, cast and offload decisions, hook dispatch. On a pruned step the GPU work is small
enough that this host time becomes the step time. The lean path asks the host, once per layer
and run, for a plain function that does the layer's exact arithmetic on its weights
(`torch.nn.functional`), and checks for an interrupt once per block instead of once per layer.
Where the host has no such function (weights cast or offloaded per call, LoRA applied per call,
quantized or custom layer types) the layer's own module is called, so the result never differs
from the unpatched model.
"""
from __future__ import annotations

from typing import Callable, Protocol


class LayerHost(Protocol):
    def functional(self, module) -> Callable | None:
        """A function computing `module(x)` with the same arithmetic, or None to call the module."""

    def check_interrupt(self) -> None:
        """Raise the host's interrupt exception if the user cancelled (once per block)."""


def resolve(host: LayerHost | None, module) -> Callable:
    """The callable a pruned block uses for `module` (decided once per run by the caller)."""
    if host is not None:
        fn = host.functional(module)
        if fn is not None:
            return fn
    return module


class LayerResolver:
    """resolve() for one block, remembering which layers stay modules (shown in CAT Stats)."""

    def __init__(self, host: LayerHost):
        self.host = host
        self.modules: list[str] = []  # type names of the layers called as modules

    def __call__(self, module) -> Callable:
        fn = resolve(self.host, module)
        if fn is module:
            self.modules.append(type(module).__name__)
        return fn


def block_math(ctx, key, layer_host: LayerHost | None, build: Callable):
    """The block's math for this run, built once by `build(layer_host or None)` at its first
    capture or pruned call (the layers are loaded and patched by then); a lean block checks for
    an interrupt here, once, instead of once per layer."""
    math = ctx.prepared.get(key)
    if math is None:
        math = ctx.prepared[key] = build(layer_host if ctx.lean else None)
    if math.lean:
        layer_host.check_interrupt()
    return math
