"""User-facing settings of CAT Pruning, validated once so the hot path never re-checks them."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


SELECTIONS = ("cat", "random")
BLOCK_MATHS = ("lean", "modules")
CACHE_SPACES = ("auto", "velocity", "denoised")
EXECUTIONS = ("auto", "eager", "graph")
RANKINGS = ("predicted_error", "reference_drift")


class SettingsError(ValueError):
    """A setting is out of range; the message names the setting and its allowed range."""


@dataclass(frozen=True)
class CATSettings:
    """Knobs of the method (defaults follow the paper's SD3 setup: keep 0.3, 20 clusters; the warm-up
    is automatic, t0 = 8 at the paper's 28 steps).

    keep_ratio     share of image tokens recomputed at each pruned step (1.0 = exact, no savings)
    warmup_steps   full sampler steps before pruning starts; the last one fills the caches.
                   0 = automatic: a share of the run's steps, and runs too short to prune stay
                   exactly unpatched (cat_core.schedule: AUTO_*)
    cooldown_steps full sampler steps at the end (0 = the paper's schedule). The last steps set
                   the fine detail, where a stale token's output goes almost straight into the
                   image; multistep samplers such as dpmpp_2m want one more
    num_clusters   k-means clusters over image tokens (computed once per run)
    stale_share    share of each step's budget given to the least recently refreshed tokens
    cluster_iters  Lloyd iterations of k-means (fixed so clustering launches a static graph)
    feature_scale  weight of output features against 2-D position in k-means (small = spatial)
    seed           seed of k-means initialisation (and of the random-selection ablation)
    refresh_first_block
                   recompute the first block's keys/values for every image token at each pruned
                   step: that block's input is exact for all tokens, so one projection gives the
                   recomputed tokens current context instead of stale keys
    pair_cfg       share one selection between the CFG halves (cond/uncond rows) of each image
                   batched in one call: guidance amplifies a token that is fresh in one half and
                   stale in the other by the CFG scale
    ranking        how the drift part of the budget ranks tokens: "predicted_error" (each token's
                   measured drift rate times the calls since its last refresh: how far its cached
                   output is expected to be off) or "reference_drift" (the paper's: the change of
                   its output since the capture step; the default before 0.5.0). Not in the UI
    extrapolation  a token that is not recomputed is served its cached output plus this share of
                   the change per call its output showed between its last two computations (one
                   call ahead; cat_core.stale_outputs). 0 = the cached output as is (the paper's,
                   and the behaviour before 0.5.1). An advanced input of the settings node
    selection      "cat" (the method) or "random" (same budget, uniformly random tokens: an ablation
                   baseline for benchmarks and tests, not offered in the UI)
    reuse_threshold
                   during the pruned phase, a call whose output is predicted to have changed by
                   less than this (relative to the last computed call) is not run at all: every
                   token's output comes from the cache. 0 = off. The prediction follows EasyCache:
                   the output changes as much per unit of input change as it did last time
    max_reuses_in_row
                   at most this many calls in a row are reused (the prediction extrapolates from
                   the last computed call, and its error grows with each skipped one). Not in the UI
    prune_any_sampler
                   also prune with samplers whose images CAT does not keep close to the unpatched
                   ones yet (the host's sampler table says which); off: such runs stay unpruned
    cache_space    what the output cache holds for reused tokens: "velocity", "denoised" (the
                   model's x0 prediction), or "auto" (the host's sampler table; velocity without
                   one). Not offered in the UI
    block_math     "lean" (pruned and capture calls do the block math with torch.nn.functional on
                   the layers' weights wherever that is the same arithmetic, so few Python calls
                   per block) or "modules" (they call the host's layer modules: the fallback, and
                   the baseline of the host-cost benchmark; not offered in the UI)
    execution      how pruned calls are launched: "eager" (kernel by kernel from Python),
                   "graph" (each call layout's pruned call captured once in a CUDA graph and
                   replayed, checked against eager at its first replay; needs CUDA, and falls back
                   to eager with a note in CAT Stats), or "auto" (graphs on CUDA where the weights
                   are resident and no ControlNet or other patch needs the full stream, else eager)

    Measured effects of these choices are in the README ("Measured results").
    """

    keep_ratio: float = 0.3
    warmup_steps: int = 0
    cooldown_steps: int = 1
    num_clusters: int = 20
    stale_share: float = 0.5
    cluster_iters: int = 10
    feature_scale: float = 0.05
    seed: int = 0
    refresh_first_block: bool = True
    pair_cfg: bool = True
    selection: str = "cat"
    ranking: str = "predicted_error"
    extrapolation: float = 0.5
    reuse_threshold: float = 0.0
    max_reuses_in_row: int = 2
    prune_any_sampler: bool = False
    block_math: str = "lean"
    cache_space: str = "auto"
    execution: str = "auto"

    def __post_init__(self):
        _check_range("keep_ratio", self.keep_ratio, 0.01, 1.0)
        _check_int("warmup_steps", self.warmup_steps, 0, 1000)
        _check_int("cooldown_steps", self.cooldown_steps, 0, 1000)
        _check_int("num_clusters", self.num_clusters, 1, 256)
        _check_range("stale_share", self.stale_share, 0.0, 1.0)
        _check_int("cluster_iters", self.cluster_iters, 0, 100)
        _check_range("feature_scale", self.feature_scale, 0.0, 100.0)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_range("reuse_threshold", self.reuse_threshold, 0.0, 1.0)
        _check_range("extrapolation", self.extrapolation, 0.0, 1.0)
        _check_int("max_reuses_in_row", self.max_reuses_in_row, 1, 100)
        for name in ("refresh_first_block", "pair_cfg", "prune_any_sampler"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.selection not in SELECTIONS:
            raise SettingsError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.ranking not in RANKINGS:
            raise SettingsError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.cache_space not in CACHE_SPACES:
            raise SettingsError(f"cache_space must be one of {CACHE_SPACES}, got {self.cache_space!r}")
        if self.execution not in EXECUTIONS:
            raise SettingsError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.block_math not in BLOCK_MATHS:
            raise SettingsError(f"block_math must be one of {BLOCK_MATHS}, got {self.block_math!r}")

    def token_budget(self, num_tokens: int) -> int:
        """Tokens recomputed per row at a pruned step; at least one, at most all."""
        return max(1, min(num_tokens, int(round(self.keep_ratio * num_tokens))))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CATSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown CAT setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_range(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be in [{lo}, {hi}], got {value}")
