"""Graph replay of pruned model calls (the `execution` setting).

A pruned step launches little GPU work, so eagerly its time is the host's time to enqueue the
kernels (README, Performance). A CUDA graph records the kernels of one pruned call of a layout
and replays them with one launch. That is only valid while everything the recorded kernels read
sits at the same address with the same meaning: the static input copies made here, the
layout's caches and selection buffer (updated in place, runtime._store), and the weights. So a
replay is used only while shapes, dtypes, devices, weight storage and buffer addresses are
unchanged, the first replay of every capture is checked against the eager call on the same
inputs, and any doubt (a mismatch, a capture or replay error) turns graphs off for the rest of
the run with one note. A replay runs no Python, and needs none: blocks charge no MACs, the
runtime charges every call from the adapter's cost model and the layout's token counts (read
by the layout's first call), so stats of replayed calls equal eager ones; the self-check also
compares the token counts the capture run read with the eager call's.

The capture mechanism is a class (`CudaGraphCapture` here) so tests substitute a CPU stand-in
with the same interface and exercise all of this logic without a GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .runtime import CallContext

log = logging.getLogger("CAT Pruning")

#: re-captures of one layout (inputs or weights changed) before graphs are turned off
MAX_CAPTURES = 3


class CudaGraphCapture:
    """One CUDA graph. capture(fn) runs fn once eagerly on a side stream (lazy initialisation,
    e.g. cuBLAS workspaces, must not happen while capturing), records a second run, and returns
    its outputs, which every replay() rewrites in place."""

    @staticmethod
    def unsupported(device: torch.device) -> str | None:
        """Why graphs cannot run for tensors on `device` (None: they can)."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"needs a CUDA device (this run is on {device.type})"
        return None

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a preview decoder) must not break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


#: The capture class in use; tests substitute a stand-in with the same interface.
CAPTURE = CudaGraphCapture


@dataclass
class GraphCall:
    """What the host gives the replay layer for one model call.

    inputs:  the per-call tensors (and plain values) `run` reads: nested dicts, lists and tuples
             of tensors are copied into static buffers of the same structure before each replay
    run:     run(ctx, inputs) -> denoised: the call with CAT's block hooks on these inputs
    weights: the model's parameters and buffers, read at every call (their storage and version
             must stay what the graph recorded)
    blocker: why this call must run eager (another patch or a ControlNet needs the full stream)
    check:   called before each replay: the host's interrupt check, which the blocks' Python
             would have made
    """

    inputs: dict
    run: Callable
    weights: Callable[[], Iterable[torch.Tensor]]
    blocker: str | None = None
    check: Callable[[], None] | None = None


def module_tensors(module: torch.nn.Module) -> Callable[[], list]:
    """weights() for GraphCall: the module's parameters and buffers, looked up at every call
    (a weight patch may replace a parameter object on its module)."""
    modules = list(module.modules())

    def weights():
        return [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
    return weights


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) between a replay and the eager call: the same kernels, so only the
    reduction order of a few library calls may differ."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-2
    return 1e-4, 1e-5


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; their storage still counts
        return -1


def _signature(value):
    """What must stay the same for a captured graph to stand for a call on `value`."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, str(value.device))
    if isinstance(value, dict):
        return ("D", tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("L", type(value).__name__, tuple(_signature(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("V", value)
    return ("O", id(value))  # an object the host passes along (options): the same object


def _static_copy(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).copy_(value)
    if isinstance(value, dict):
        return {k: _static_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_static_copy(v) for v in value)
    return value


def _copy_into(static, value) -> None:
    if isinstance(value, torch.Tensor):
        static.copy_(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _copy_into(static[k], v)
    elif isinstance(value, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)


def _layout_buffers(layout) -> tuple:
    """Addresses of the buffers a pruned call reads and writes in place: caches and selection."""
    ptrs = [t.data_ptr() for b in layout.blocks for t in (b.k, b.v, b.k2, b.v2) if t is not None]
    ptrs.append(layout.next_index.data_ptr() if layout.next_index is not None else 0)
    return tuple(ptrs)


def _fresh_context(ctx: CallContext) -> CallContext:
    """A context like ctx with nothing read yet, for the runs that are recorded rather than
    counted (warm-up and capture)."""
    fresh = CallContext(ctx.mode, ctx.layout, ctx.index, ctx.refresh_first_block, prepared=ctx.prepared, lean=ctx.lean)
    fresh.context_shape, fresh.x = ctx.context_shape, ctx.x
    return fresh


class _Capture:
    """One captured pruned call of a layout."""

    def __init__(self, key, graph, static_inputs, output, tokens):
        self.key, self.graph, self.static_inputs, self.output = key, graph, static_inputs, output
        self.tokens = tokens  # the CallTokens its blocks read (the runtime charges MACs from the layout's)


class GraphReplay:
    """The replay layer of one sampler run (PruningRun.graph)."""

    def __init__(self, setting: str, note: Callable[[str], None], capture_class=None):
        self.setting = setting  # "auto" or "graph"
        self._note, self._noted = note, set()
        self.capture_class = capture_class or CAPTURE
        self.off = None  # why graphs were turned off for the rest of the run
        self.captures: dict = {}  # id(layout) -> _Capture
        self.capture_counts: dict = {}
        self.stats = {"setting": setting, "replayed": 0, "eager": 0, "captures": 0, "eager_reason": None}

    def note(self, text: str) -> None:
        """One note (and log line) per distinct reason."""
        if text not in self._noted:
            self._noted.add(text)
            self._note(text)

    def eager(self, run_eager):
        """A pruned call after graphs were turned off for the run (counted as such)."""
        return self._eager(self.off, run_eager)

    def _eager(self, reason: str | None, run_eager):
        self.stats["eager"] += 1
        if reason is not None and self.stats["eager_reason"] is None:
            self.stats["eager_reason"] = reason
        return run_eager()

    def _turn_off(self, reason: str) -> None:
        self.off = reason
        self.captures.clear()
        self.note(f"graph replay turned off: {reason}; the pruned calls ran eager")

    def call(self, ctx: CallContext, call: GraphCall, device: torch.device, run_eager: Callable[[], torch.Tensor],
             passthrough: tuple = ()) -> torch.Tensor:
        """The pruned call's denoised output: run_eager() (the host's usual call on ctx), or a
        replay where that is known to give the eager result."""
        if self.off is not None:
            return self._eager(self.off, run_eager)
        unsupported = self.capture_class.unsupported(device)
        if unsupported is not None:
            if self.setting == "graph":
                self._turn_off(f"execution graph {unsupported}")
            else:
                self.off = f"auto: {unsupported}"
            return self._eager(self.off, run_eager)
        if call.blocker is not None:
            if self.setting == "graph":
                self.note(f"graph replay not used where {call.blocker}; those pruned calls ran eager")
            return self._eager(call.blocker, run_eager)
        weights = call.weights()
        if any(w.device != device for w in weights):
            reason = f"weights are not resident on {device} (low-VRAM or offloaded loading)"
            if self.setting == "graph":
                self._turn_off(reason)
            return self._eager(reason, run_eager)
        key = (_signature(call.inputs), tuple((w.data_ptr(), _version(w)) for w in weights), _layout_buffers(ctx.layout))
        layout_id = id(ctx.layout)
        captured = self.captures.get(layout_id)
        fresh = captured is None or captured.key != key
        try:
            if fresh:
                self.captures.pop(layout_id, None)
                count = self.capture_counts[layout_id] = self.capture_counts.get(layout_id, 0) + 1
                if count > MAX_CAPTURES:
                    self._turn_off(f"the inputs or weights of a call layout kept changing ({MAX_CAPTURES} captures)")
                    return self._eager(None, run_eager)
                captured = self._capture(ctx, call, key, device)
                first = captured.output.clone()
            else:
                if call.check is not None:
                    call.check()
                _copy_into(captured.static_inputs, call.inputs)
                captured.graph.replay()
        except passthrough:
            raise
        except Exception as error:  # noqa: BLE001 - a graph problem must cost at most the graph
            self._turn_off(f"{type(error).__name__} in graph capture or replay ({error})")
            return self._eager(None, run_eager)
        if fresh:
            return self._check(ctx, captured, first, run_eager)
        self.stats["replayed"] += 1
        return captured.output

    def _capture(self, ctx: CallContext, call: GraphCall, key, device) -> _Capture:
        """Capture the call on static copies of its inputs and replay it once."""
        static_inputs = _static_copy(call.inputs)
        recorded = {}

        def body():
            scratch = _fresh_context(ctx)
            out = call.run(scratch, static_inputs)
            recorded["tokens"] = scratch.tokens
            return out

        graph = self.capture_class(device)
        output = graph.capture(body)
        graph.replay()
        self.stats["captures"] += 1
        return _Capture(key, graph, static_inputs, output, recorded["tokens"])

    def _check(self, ctx: CallContext, captured: _Capture, replayed: torch.Tensor, run_eager) -> torch.Tensor:
        """Compare the first replay with the eager call on the same inputs. Eager runs last, so
        the caches hold exactly what an eager call writes; its result is this call's."""
        eager = self._eager(None, run_eager)
        reason = None
        if replayed.shape != eager.shape or replayed.dtype != eager.dtype:
            reason = f"its first replay gave {tuple(replayed.shape)} {replayed.dtype}, eager {tuple(eager.shape)} {eager.dtype}"
        elif not torch.allclose(replayed, eager, *tolerance(eager.dtype)):
            diff = float((replayed.float() - eager.float()).abs().max())
            reason = f"its first replay differed from the eager call (max abs diff {diff:.3g})"
        elif captured.tokens != ctx.tokens:
            reason = "the captured call read other token counts (so MACs) than the eager call"
        if reason is not None:
            self._turn_off(reason)
        else:
            self.captures[id(ctx.layout)] = captured
        return eager
