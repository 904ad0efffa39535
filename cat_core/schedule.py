"""When a run prunes: the sampler-step clock and the plan of full, capture and pruned steps."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class CallMode(enum.Enum):
    DENSE = "dense"  # warm-up: the original blocks run, nothing is cached
    CAPTURE = "capture"  # full computation that (re)fills every cache of the layout
    PRUNED = "pruned"  # only the selected image tokens are recomputed
    REUSE = "reuse"  # nothing is recomputed: every token's output comes from the cache


#: warmup_steps = AUTO: the warm-up follows the run's step count (see StepPlan.for_run)
AUTO = 0
#: the automatic schedule's share of the steps that run in full before pruning starts ...
AUTO_WARMUP_SHARE = 0.3
#: ... but never more than this many: longer runs settle after about as many steps
AUTO_MAX_WARMUP = 8
#: ... and of step reuse only, whose change predictor holds back by itself while the output moves
AUTO_REUSE_WARMUP_SHARE = 0.18
#: the automatic schedule leaves shorter runs exactly unpatched (few-step models and LoRAs)
AUTO_MIN_STEPS = 20
#: ... except with step reuse only (no token pruning), whose change predictor holds back by itself
#: in short runs; shorter runs than this stay unpatched either way
AUTO_MIN_REUSE_STEPS = 8
#: the automatic warm-up when the host does not say how many steps the run has
AUTO_UNKNOWN_WARMUP = 8


@dataclass(frozen=True)
class StepPlan:
    """Which sampler steps run in full, which one fills the caches, which prune.

    Steps before `warmup_steps - 1` run in full, that step captures, then steps prune until the
    last `cooldown_steps`, which run in full again. When no pruned step would be left between the
    capture and the cool-down, the whole run stays dense (a capture nobody reads costs time).
    Without a known step count (a host that does not say) there is no cool-down.
    """

    warmup_steps: int
    cooldown_steps: int
    total_steps: int | None = None
    unpruned_reason: str | None = None  # the whole run stays dense by design, and why

    @classmethod
    def for_run(cls, warmup_steps: int, cooldown_steps: int, total_steps: int | None = None,
                token_pruning: bool = True) -> "StepPlan":
        """The plan of a run; warmup_steps = AUTO scales the warm-up with the step count, and
        leaves runs shorter than AUTO_MIN_STEPS unpruned (their steps are too few and too large
        for cached tokens to stand in for fresh ones; AUTO_MIN_REUSE_STEPS with step reuse only)."""
        if warmup_steps != AUTO:
            return cls(warmup_steps, cooldown_steps, total_steps)
        if total_steps is None:
            return cls(AUTO_UNKNOWN_WARMUP, cooldown_steps, None)
        shortest = AUTO_MIN_STEPS if token_pruning else AUTO_MIN_REUSE_STEPS
        if total_steps < shortest:
            return cls(total_steps, cooldown_steps, total_steps, unpruned_reason=(
                f"not pruned: the automatic schedule leaves runs of fewer than {shortest} steps unpatched "
                f"(this one has {total_steps}); set warmup_steps to prune anyway"))
        share = AUTO_WARMUP_SHARE if token_pruning else AUTO_REUSE_WARMUP_SHARE
        return cls(min(AUTO_MAX_WARMUP, max(2, round(share * total_steps))), cooldown_steps, total_steps)

    @property
    def capture_step(self) -> int:
        return self.warmup_steps - 1

    def full_from(self) -> int | None:
        """First step that runs in full again (None: never, the step count is unknown)."""
        if self.total_steps is None:
            return None
        full_from = self.total_steps - self.cooldown_steps
        if self.unpruned_reason is not None:
            return 0
        return self.capture_step if full_from <= self.warmup_steps else full_from

    def mode(self, step: int) -> CallMode:
        full_from = self.full_from()
        if step < self.capture_step or (full_from is not None and step >= full_from):
            return CallMode.DENSE
        return CallMode.CAPTURE if step == self.capture_step else CallMode.PRUNED

    def modes(self) -> list[CallMode]:
        """The mode of every step of a run of `total_steps` steps."""
        return [self.mode(step) for step in range(self.total_steps or 0)]


class SamplerClock:
    """The sampler step a model evaluation belongs to, from the sampler's per-step callback.

    Two-call samplers (heun, dpm_2, dpmpp_2s) call the callback *between* a step's two
    evaluations, so the evaluation right after callback i may still belong to step i. The
    number of such extra evaluations is learnt from step 0 and applied from then on.
    """

    def __init__(self):
        self.step = 0
        self._callbacks_seen = 0
        self._evals_since_callback = 0
        self._extra_evals = 0
        self._last_callback = -1

    def on_step_end(self, step_index: int) -> None:
        """Sampler callback, once per step after the step's first model evaluation."""
        if self._callbacks_seen == 1:
            # Evaluations between the first two callbacks: step 0's extra ones + step 1's first.
            self._extra_evals = max(0, self._evals_since_callback - 1)
        self._callbacks_seen += 1
        self._evals_since_callback = 0
        self._last_callback = step_index
        self.step = step_index + 1

    def begin_evaluation(self) -> None:
        """Once per sampler model evaluation (all cond chunks), before its model calls."""
        if self._callbacks_seen >= 2 and self._evals_since_callback < self._extra_evals:
            self.step = self._last_callback
        elif self._callbacks_seen >= 1:
            self.step = self._last_callback + 1
        self._evals_since_callback += 1
