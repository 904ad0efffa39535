"""Per-sampling-run state: which calls prune, the caches of each call layout, and the stats.

A `PruningRun` lives for exactly one sampler run (the host creates it in an outer wrapper and
drops it afterwards), so nothing leaks between runs of different sizes, batches or seeds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from typing import Callable

from .accounting import CallShape, CallTokens, CostModel, MacLedger, no_block_costs
from .indices import CallIndices
from .clustering import kmeans
from .config import CATSettings
from .selection import advance_age, drift_scores, predicted_error, select_tokens, update_drift_rate, update_staleness
from .stale_outputs import extrapolated, update_change
from .tokens import grid_positions, hilbert_order, latent_to_tokens, token_grid, token_mask_to_latent, token_values_to_latent
from .schedule import CallMode, SamplerClock, StepPlan

log = logging.getLogger("CAT Pruning")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about the patched transformer."""

    arch: str
    patch: int
    num_blocks: int  # blocks that keep a K/V cache (hooked blocks)
    outer_macs: Callable[[int, int, int], int]  # (rows, text tokens, image tokens) -> MACs outside the blocks
    # the blocks' MACs (and the token-dependent ones outside them) from shapes: charged per call
    # by the runtime, computed once per layout and CallShape (blocks never count)
    cost: CostModel = no_block_costs


class BlockCache:
    """Attention keys/values of one block for text + all image tokens (k2/v2: MMDiT-X image-only)."""

    __slots__ = ("k", "v", "k2", "v2")

    def __init__(self):
        self.k = self.v = self.k2 = self.v2 = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k2, self.v2) if t is not None)


class LayoutState:
    """Caches of one call layout: the same conds (uuids), batch and latent size across steps."""

    def __init__(self, batch: int, latent_hw: tuple[int, int], info: ModelInfo, settings: CATSettings, device, chunks: int = 1):
        self.batch = batch
        # Rows are chunk-major (ComfyUI: [uncond rows, cond rows]); with pairing, the rows of one
        # image in every chunk share one selection.
        self.groups = chunks if settings.pair_cfg and chunks > 1 and batch % chunks == 0 else 1
        self.latent_hw = latent_hw
        self.grid = token_grid(*latent_hw, info.patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.budget = settings.token_budget(self.num_tokens)
        self.blocks = [BlockCache() for _ in range(info.num_blocks)]
        self.ready = False
        self.last_output = None  # [B, C, H, W] fp32: latest (composited) model output
        self.reference = None  # [B, L, F] tokens of the output at the capture step
        self.labels = None  # [B, L] cluster of each token
        self.staleness = None  # [B, L] decayed refresh counts
        # ranking "predicted_error": each token's output drift per call, and calls since its refresh
        self.drift_rate = self.age = None  # [B, L] fp32
        self.output_change = None  # [B, C, H, W] fp32: each token's output change per call (extrapolation)
        self.next_index = None  # [B, k] tokens to recompute at the next pruned call
        self.refreshes = torch.zeros(batch, self.num_tokens, device=device)
        # Equally stale tokens are refreshed in Hilbert-curve order, i.e. as compact regions.
        self.tiebreak = hilbert_order(self.grid).to(device).expand(batch, -1)
        self.selection_masks = []  # per pruned call, [B, L] bool on device (for stats)
        # The token counts (CallTokens) of the layout's calls, by the call's text-context shape,
        # read by the first hooked block of the first call: later dense calls run without CAT's
        # hooks, and reused and replayed calls run none, yet are charged from these
        self.call_tokens: dict = {}
        self.costs: dict = {}  # CallShape -> MacLedger of one call: computed once per layout and shape
        # Cond and uncond the host could not batch (prompts of different lengths, e.g. PixArt's
        # unpadded T5) come as separate calls of one image: with pair_cfg the later layouts follow
        # the first one's selection. `pinned`: the selection of step `pinned_step`, kept for them.
        self.leader: "LayoutState | None" = None
        self.followers = 0
        self.pinned = None
        self.pinned_step = -1
        self.pending_scores, self.pending_count, self.pending_step = None, 0, -1  # drift of the paired calls so far
        # Step reuse (reuse_threshold): input and output of the last computed call, and how much
        # the output moved per unit of input movement between the last two computed calls
        self.change_x = self.change_out = self.change_rate = self.out_norm = None
        self.reuses_in_row = 0

    def cache_bytes(self) -> int:
        return sum(b.nbytes() for b in self.blocks)

    def release(self) -> None:
        self.blocks = [BlockCache() for _ in self.blocks]
        self.last_output = self.reference = self.next_index = self.pinned = self.drift_rate = self.age = None
        self.output_change = None
        self.pinned_step = -1


class CallContext:
    """What the block hooks of one model call need: the mode, the layout and the selection."""

    def __init__(self, mode: CallMode, layout: LayoutState, index: torch.Tensor | None, refresh_first_block: bool = False,
                 prepared: dict | None = None, lean: bool = False):
        self.mode = mode
        self.layout = layout
        self.index = index
        # Per run, per block: what the adapter prepared once (e.g. the layers it resolved).
        self.prepared = {} if prepared is None else prepared
        self.lean = lean
        # PRUNED: the first block computes keys/values of every image token (its input is exact).
        self.refresh_first_block = refresh_first_block
        self.tokens: CallTokens | None = None  # read once per call by the first hooked block (blocks/hooks.py)
        self.context_shape = None  # the host's text context of this call (its token counts are keyed by it)
        self.hooks_skipped = False  # a dense call run without CAT's block hooks
        self.x = None  # the call's input latent (read by step reuse)
        # the block adapter's per-call memo (what its blocks share that is not an index set)
        self.adapter_state: dict = {}
        self._indices = None

    @property
    def indices(self) -> CallIndices:
        """The call's index sets, shared by every block (built at first use: the selection is final)."""
        if self._indices is None:
            self._indices = CallIndices(self.index)
        return self._indices


@dataclass
class CallRecord:
    step: int
    mode: str
    rows: int
    tokens_computed: int
    tokens_total: int


@dataclass
class RunStats:
    """What a finished run did; everything on the CPU so it outlives the run's tensors."""

    settings: dict
    calls: list = field(default_factory=list)
    ledger: MacLedger = field(default_factory=MacLedger)
    peak_cache_bytes: int = 0
    wall_seconds: float = 0.0
    fallback_reason: str | None = None  # the run (or all of its calls) ran unpruned, and why
    warmup_used: int | None = None  # the warm-up the run's plan resolved to (the setting may be automatic)
    reuse_used: float = 0.0  # the step-reuse threshold the run used (the sampler may have chosen it)
    notes: list = field(default_factory=list)  # why some calls ran unpruned while the others pruned
    # pruned blocks' math: {"setting", "lean_blocks", "blocks", "module_layers": {type name: count}}
    block_math: dict = field(default_factory=dict)
    refresh_maps: list = field(default_factory=list)  # per layout: [B, Hp, Wp] refresh counts
    staleness_maps: list = field(default_factory=list)  # per layout: [B, Hp, Wp] at the end
    cluster_maps: list = field(default_factory=list)  # per layout: [B, Hp, Wp] labels
    selection_masks: list = field(default_factory=list)  # per layout: [calls, B, Hp, Wp] bool
    execution: dict = field(default_factory=dict)  # graph replay of pruned calls (cat_core.graph), if tried

    def steps(self) -> list[dict]:
        """Per sampler step: calls, image tokens computed and total (all rows)."""
        out = {}
        for c in self.calls:
            s = out.setdefault(c.step, {"step": c.step, "calls": 0, "computed": 0, "total": 0, "modes": []})
            s["calls"] += 1
            s["computed"] += c.tokens_computed
            s["total"] += c.tokens_total
            s["modes"].append(c.mode)
        return [out[k] for k in sorted(out)]


def _summarize_block_math(prepared) -> dict:
    """What the blocks of one run used: {"lean_blocks", "blocks", "module_layers": {type: count}}."""
    module_layers: dict[str, int] = {}
    lean = 0
    for math in prepared:
        lean += bool(math.lean)
        for name in math.module_layers:
            module_layers[name] = module_layers.get(name, 0) + 1
    return {"lean_blocks": lean, "blocks": len(prepared), "module_layers": dict(sorted(module_layers.items()))}


def _merge_pairs(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups * images, ...] -> [images, ...]: mean over the chunks (CFG halves) of each image."""
    return rows if groups == 1 else rows.view(groups, rows.shape[0] // groups, *rows.shape[1:]).mean(dim=0)


def _split_pairs(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """[images, ...] -> [groups * images, ...]: the same value for every chunk of an image."""
    return rows if groups == 1 else rows.repeat(groups, *([1] * (rows.dim() - 1)))


def _store(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Write into the layout's buffer from the capture call on, so pruned calls keep its storage
    (a replayed graph reads fixed addresses); allocate only the first time."""
    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
        return value
    return buffer.copy_(value)


def _own(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Like _store, but the first allocation is a copy too: the buffer never aliases the caller's
    tensor (the sampler's x, or another buffer of the layout)."""
    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
        return value.clone()
    return buffer.copy_(value)


def random_tokens(layout: LayoutState, generator: torch.Generator) -> torch.Tensor:
    """Ablation baseline: the same budget of uniformly random tokens per row (paired like CAT's)."""
    noise = torch.rand(layout.batch // layout.groups, layout.num_tokens, generator=generator).to(layout.refreshes.device)
    return _split_pairs(noise.topk(layout.budget, dim=1).indices.sort(dim=1).values, layout.groups)


class PruningRun:
    """Drives one sampler run: decides each call's mode and updates caches and selection after it."""

    def __init__(self, settings: CATSettings, info: ModelInfo):
        self.settings = settings
        self.info = info
        self.clock = SamplerClock()
        self.plan = StepPlan.for_run(settings.warmup_steps, settings.cooldown_steps)
        self._disabled = False
        self._sampler_unpruned = False
        self._total_steps = None
        self.reuse_threshold = settings.reuse_threshold  # the sampler may choose step reuse instead (use_sampler)
        # "auto": the sampler table's choice for token pruning; step reuse measured best in x0 space
        self.cache_space = settings.cache_space if settings.cache_space != "auto" else (
            "denoised" if settings.reuse_threshold > 0 else "velocity")
        self.layouts: dict = {}
        self.prepared: dict = {}  # adapters' per-block preparations for this run
        self.graph = None  # cat_core.graph.GraphReplay: made by model_call at the run's first pruned call
        self.stats = RunStats(settings=settings.as_dict(), warmup_used=self.plan.warmup_steps, reuse_used=self.reuse_threshold)
        self._random = torch.Generator().manual_seed(settings.seed)
        self._started = time.perf_counter()

    # -- step accounting -------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The sampler step the current model evaluation belongs to."""
        return self.clock.step

    def start_sampling(self, total_steps: int) -> None:
        """Host: the number of sampler steps (len(sigmas) - 1), so the cool-down steps run in full."""
        self._total_steps = int(total_steps)
        self._resolve_plan()

    def _resolve_plan(self) -> None:
        s = self.settings
        self.plan = StepPlan.for_run(s.warmup_steps, s.cooldown_steps, self._total_steps, token_pruning=not self.reuse_only)
        self.stats.warmup_used = None if self.plan.unpruned_reason else self.plan.warmup_steps

    def use_sampler(self, name: str, cache_space: str | None, unsupported: str | None = None,
                    reuse_instead: float | None = None) -> None:
        """Host: the run's sampler. `cache_space`: the output cache that keeps its images closest
        with token pruning (used when the setting is "auto"); `unsupported`: why token pruning
        cannot keep this sampler's images close yet; `reuse_instead`: a step-reuse threshold that
        does (the host's sampler table), used when the user set no reuse of their own and keeps
        fewer than all tokens. Without either, such a run stays unpruned unless prune_any_sampler
        is set."""
        s = self.settings
        # keep_ratio 1.0 asks for the exact image: no reuse the user did not set
        if reuse_instead and s.reuse_threshold == 0 and not s.prune_any_sampler and s.keep_ratio < 1.0:
            self.reuse_threshold = self.stats.reuse_used = reuse_instead
            if s.cache_space == "auto":
                self.cache_space = "denoised"
            why = unsupported or "keeps closer to the unpatched image with step reuse than with token pruning"
            self.note_unpruned(f"tokens not pruned: sampler {name} {why}; step reuse {reuse_instead:g} instead "
                               "(set reuse_threshold, or prune_any_sampler to prune tokens)")
        else:
            reuse = s.reuse_threshold > 0
            if s.cache_space == "auto" and cache_space is not None and not reuse:
                self.cache_space = cache_space
            if unsupported is not None and not s.prune_any_sampler:
                self._sampler_unpruned = True
                if reuse:  # whole-call reuse holds up with these samplers where token pruning does not (README)
                    self.note_unpruned(f"tokens not pruned: sampler {name} {unsupported}; step reuse only, which holds up with it")
                else:
                    self.note_unpruned(f"not pruned: sampler {name} {unsupported}; set prune_any_sampler to prune anyway")
        if self._total_steps is not None:
            self._resolve_plan()  # reuse only may allow shorter runs

    @property
    def reuse_only(self) -> bool:
        """Step reuse replaces token pruning: with both, a token the selection skips also misses the
        reused calls and its cached output ages twice as fast (measured worse than either alone,
        README). The computed calls then run as the model's own."""
        return self.reuse_threshold > 0

    def on_step_end(self, step_index: int) -> None:
        """Host: the sampler's per-step callback."""
        self.clock.on_step_end(step_index)

    def begin_evaluation(self) -> None:
        """Host: once per sampler model evaluation (all cond chunks), before its model calls."""
        self.clock.begin_evaluation()

    def disable(self, reason: str) -> None:
        """Run the rest of this run densely (used after an error inside a pruned call)."""
        self._disabled = True
        if self.stats.fallback_reason is None:
            self.stats.fallback_reason = reason
        for layout in self.layouts.values():
            layout.release()
            layout.ready = False

    def note_unpruned(self, reason: str) -> None:
        """Record (once per reason) why some model calls bypassed pruning; the others still prune."""
        if reason not in self.stats.notes:
            self.stats.notes.append(reason)
            log.warning("CAT Pruning: %s.", reason)

    # -- per call ----------------------------------------------------------------------------
    def begin_call(self, latent_shape, chunk_keys, device, context_shape=None, x: torch.Tensor | None = None) -> CallContext:
        """The context of one model call. context_shape: the host's text context (dense calls of
        one layout and context cost the same, so only the first runs through the block hooks);
        x: the call's input (step reuse predicts the output's change from it)."""
        batch, _, h, w = latent_shape
        key = (tuple(chunk_keys), batch, h, w, str(device))
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = LayoutState(batch, (h, w), self.info, self.settings, device, chunks=len(key[0]))
            self._pair_with_earlier_call(layout, key)
        mode = self.plan.mode(self.step)
        if self.plan.unpruned_reason is not None:
            self.note_unpruned(self.plan.unpruned_reason)
        lean = self.settings.block_math == "lean"
        context_shape = tuple(context_shape) if context_shape is not None else None
        if self._disabled or mode is CallMode.DENSE or (self._sampler_unpruned and not self.reuse_only):
            ctx = CallContext(CallMode.DENSE, layout, None)
        elif self.reuse_only:
            # the warm-up's last step (the capture step of token pruning) runs in full too
            reuse = mode is CallMode.PRUNED and self._reuse_now(layout, x, context_shape)
            ctx = CallContext(CallMode.REUSE if reuse else CallMode.DENSE, layout, None)
        elif mode is CallMode.CAPTURE or not layout.ready:
            ctx = CallContext(CallMode.CAPTURE, layout, None, prepared=self.prepared, lean=lean)
        else:
            ctx = CallContext(CallMode.PRUNED, layout, self._selection_for(layout), self.settings.refresh_first_block,
                              prepared=self.prepared, lean=lean)
        ctx.context_shape = context_shape
        ctx.x = x
        return ctx

    def _pair_with_earlier_call(self, layout: LayoutState, key) -> None:
        """pair_cfg across calls: a layout of the same image size and batch as an earlier one of
        this run, but other conds, is the same image's other CFG half (the host runs every call of
        a step on the same latent), so it follows that layout's selection."""
        if not self.settings.pair_cfg or layout.groups != 1:
            return
        for (chunks, *rest), other in self.layouts.items():
            if other is not layout and tuple(rest) == key[1:] and chunks != key[0] and other.leader is None and other.groups == 1:
                layout.leader = other
                other.followers += 1
                return

    def _selection_for(self, layout: LayoutState) -> torch.Tensor:
        """The tokens a pruned call of `layout` recomputes; one selection per step for paired calls."""
        leader = layout.leader if layout.leader is not None and layout.leader.ready else None
        owner = leader or layout
        if leader is None and not layout.followers:
            return layout.next_index
        if owner.pinned_step != self.step:
            owner.pinned = _own(owner.pinned, owner.next_index)
            owner.pinned_step = self.step
        return owner.pinned

    def _choose_paired(self, layout: LayoutState, scores: torch.Tensor) -> None:
        """The next selection; for calls paired across the step, from the mean drift of all of
        them, chosen when the step's last one has reported (as in-batch pairing averages halves)."""
        owner = layout.leader or layout
        if not owner.followers:
            self._choose_next(layout, scores)
            return
        if owner.pending_step != self.step:
            owner.pending_scores, owner.pending_count, owner.pending_step = _own(owner.pending_scores, scores), 1, self.step
        else:
            owner.pending_scores.add_(scores)
            owner.pending_count += 1
        if owner.pending_count == 1 + owner.followers:
            self._choose_next(owner, owner.pending_scores / owner.pending_count)

    def _reuse_now(self, layout: LayoutState, x: torch.Tensor | None, context_shape) -> bool:
        """Step reuse: skip this call when its output is predicted to stay within the threshold of
        the last computed one. Reads one number from the device, once per call, before the call."""
        threshold = self.reuse_threshold
        if threshold <= 0 or x is None or layout.change_rate is None or layout.reuses_in_row >= self.settings.max_reuses_in_row:
            return False
        if context_shape not in layout.call_tokens:
            return False  # the MACs a reuse saves are not known yet
        predicted = layout.change_rate * (x.float() - layout.change_x).abs().mean() / layout.out_norm.clamp(min=1e-12)
        return bool(predicted < threshold)

    def _track_change(self, layout: LayoutState, x: torch.Tensor, output: torch.Tensor) -> None:
        """After a computed call: how far output and input moved since the last computed call."""
        x = x.float()
        if layout.change_x is not None and layout.change_x.shape == x.shape:
            moved_in = (x - layout.change_x).abs().mean()
            moved_out = (output - layout.change_out).abs().mean()
            layout.change_rate = moved_out / moved_in.clamp(min=1e-12)
        layout.change_x = _own(layout.change_x, x)
        layout.change_out = _own(layout.change_out, output)
        layout.out_norm = output.abs().mean()
        layout.reuses_in_row = 0

    def end_call(self, ctx: CallContext, output: torch.Tensor):
        """Merge the fresh output with cached outputs, choose the next selection, record stats.

        `output` is the model's prediction [B, C, H, W]. Returns (fp32 output to serve, mask) where
        mask [B, 1, H, W] marks the latent pixels of recomputed tokens (None: all recomputed); the
        other tokens get their cached output, carried on by the extrapolation setting.
        """
        layout = ctx.layout
        if ctx.mode is CallMode.REUSE:
            layout.reuses_in_row += 1
            self._account(ctx, 0)
            return layout.last_output, None
        output = output.float()
        mask = None
        served = None  # what the sampler gets, where it differs from the merged output cached
        if ctx.mode is CallMode.PRUNED:
            fresh = torch.zeros(layout.batch, layout.num_tokens, dtype=torch.bool, device=output.device)
            fresh.scatter_(1, ctx.index, True)
            mask = token_mask_to_latent(fresh, layout.grid, layout.latent_hw, self.info.patch)
            cached = layout.last_output
            if self.settings.extrapolation > 0:
                waited = token_values_to_latent(layout.age + 1, layout.grid, layout.latent_hw, self.info.patch)
                served = torch.where(mask, output, extrapolated(cached, layout.output_change, self.settings.extrapolation))
                update_change(layout.output_change, mask, output, cached, waited)
            output = torch.where(mask, output, cached)
            update_staleness(layout.staleness, ctx.index)
            layout.refreshes.scatter_add_(1, ctx.index, torch.ones_like(ctx.index, dtype=layout.refreshes.dtype))
            layout.selection_masks.append(fresh)
            computed = ctx.index.shape[1]
        else:
            layout.refreshes += 1
            computed = layout.num_tokens

        if ctx.mode is CallMode.CAPTURE:
            self._start_pruning(layout, output)
        elif ctx.mode is CallMode.PRUNED:
            self._choose_paired(layout, self._ranking_scores(layout, output, fresh))
        if ctx.mode is CallMode.PRUNED:
            layout.last_output = _store(layout.last_output, output)
        else:  # the buffer pruned calls write into must be the layout's own, not the caller's tensor
            layout.last_output = output.clone() if ctx.mode is CallMode.CAPTURE else output

        if self.reuse_threshold > 0 and ctx.x is not None:
            self._track_change(layout, ctx.x, output)
        self._account(ctx, computed)
        return (output if served is None else served), mask

    def _ranking_scores(self, layout: LayoutState, merged: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """What the drift share ranks by, from a pruned call's merged output, read before it
        becomes layout.last_output: the predicted error, or the paper's drift since the capture."""
        tokens = latent_to_tokens(merged, self.info.patch)
        if self.settings.ranking == "reference_drift":
            advance_age(layout.age, fresh)  # extrapolation reads it
            return drift_scores(tokens, layout.reference)
        # unselected tokens carry their cached output, so only the refreshed ones show a change
        change = drift_scores(tokens, latent_to_tokens(layout.last_output, self.info.patch))
        update_drift_rate(layout.drift_rate, layout.age, fresh, change)
        return predicted_error(layout.drift_rate, layout.age)

    def _start_pruning(self, layout: LayoutState, output: torch.Tensor) -> None:
        """After a full call: reference output, clusters once, fresh staleness, first selection."""
        s = self.settings
        tokens = latent_to_tokens(output, self.info.patch)
        previous = layout.last_output
        if previous is not None and previous.shape == output.shape:
            first_scores = drift_scores(tokens, latent_to_tokens(previous, self.info.patch))
        else:
            first_scores = torch.zeros(tokens.shape[:2], device=tokens.device)
        layout.reference = tokens
        layout.drift_rate, layout.age = first_scores.clone(), torch.zeros_like(first_scores)
        # the change of one call, from the call before the capture (none: nothing to carry on)
        layout.output_change = output - previous if previous is not None and previous.shape == output.shape else torch.zeros_like(output)
        positions = grid_positions(layout.grid, device=tokens.device).expand(layout.batch, -1, -1)
        features = torch.cat([_merge_pairs(tokens, layout.groups) * s.feature_scale, positions[: layout.batch // layout.groups]], dim=-1)
        layout.labels = _split_pairs(kmeans(features, s.num_clusters, s.cluster_iters, s.seed), layout.groups)
        layout.staleness = torch.ones(layout.batch, layout.num_tokens, device=tokens.device)
        layout.ready = True
        self._choose_next(layout, first_scores)

    def _choose_next(self, layout: LayoutState, scores: torch.Tensor) -> None:
        s = self.settings
        if s.selection == "random":
            layout.next_index = _store(layout.next_index, random_tokens(layout, self._random))
            return
        images = layout.batch // layout.groups
        index = select_tokens(
            _merge_pairs(scores, layout.groups), layout.labels[:images], min(s.num_clusters, layout.num_tokens),
            layout.staleness[:images], layout.tiebreak[:images], layout.budget, s.stale_share, layout.grid,
        )
        layout.next_index = _store(layout.next_index, _split_pairs(index, layout.groups))

    def can_skip_hooks(self, ctx: CallContext) -> bool:
        """A dense call whose token counts (so MACs) are known from an earlier call of the same layout."""
        return ctx.mode is CallMode.DENSE and ctx.context_shape in ctx.layout.call_tokens

    def call_cost(self, layout: LayoutState, shape: CallShape) -> MacLedger:
        """MACs of one call of `layout` with `shape`: the adapter's cost model, run once per shape."""
        ledger = layout.costs.get(shape)
        if ledger is None:
            ledger = MacLedger()
            for module, computed, dense in self.info.cost(shape):
                ledger.add(module, computed, dense)
            outer = self.info.outer_macs(shape.rows, shape.tokens.txt, layout.num_tokens)
            ledger.add("embed_and_final", outer, outer)
            layout.costs[shape] = ledger
        return ledger

    def _account(self, ctx: CallContext, computed_per_row: int) -> None:
        layout = ctx.layout
        rows, total = layout.batch, layout.num_tokens
        tokens = ctx.tokens or layout.call_tokens.get(ctx.context_shape) or CallTokens(txt=0, img=total)
        layout.call_tokens[ctx.context_shape] = tokens
        pruned = ctx.mode is CallMode.PRUNED
        shape = CallShape(rows, tokens, ctx.context_shape, computed_per_row if pruned else None, pruned and ctx.refresh_first_block)
        ledger = self.call_cost(layout, shape)
        if ctx.mode is CallMode.REUSE:  # nothing computed: a dense call's MACs all saved
            for module, dense in ledger.dense.items():
                self.stats.ledger.add(module, 0, dense)
        else:
            self.stats.ledger.merge(ledger)
        self.stats.calls.append(CallRecord(self.step, ctx.mode.value, rows, rows * computed_per_row, rows * total))
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, sum(l.cache_bytes() for l in self.layouts.values()))

    # -- end of run --------------------------------------------------------------------------
    def finish(self) -> RunStats:
        """Move the maps worth showing to the CPU and free every cache."""
        st = self.stats
        st.wall_seconds = time.perf_counter() - self._started
        if not st.calls and st.notes and st.fallback_reason is None:
            st.fallback_reason = st.notes[0]  # nothing went through pruning at all
        if self.prepared:
            st.block_math = {"setting": self.settings.block_math, **_summarize_block_math(self.prepared.values())}
            self.prepared.clear()
        if self.graph is not None:
            st.execution, self.graph = dict(self.graph.stats), None
        for layout in self.layouts.values():
            shape = (layout.batch, *layout.grid)
            st.refresh_maps.append(layout.refreshes.view(shape).cpu())
            if layout.staleness is not None:
                st.staleness_maps.append(layout.staleness.view(shape).cpu())
                st.cluster_maps.append(layout.labels.view(shape).cpu())
            if layout.selection_masks:
                st.selection_masks.append(torch.stack(layout.selection_masks).view(-1, *shape).cpu())
            layout.release()
            layout.selection_masks = []
        self.layouts.clear()
        return st
