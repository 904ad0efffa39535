"""Multiply-accumulates of what was actually computed, next to what a dense call would cost.

Only matrix products are counted (linear layers, the patch conv, attention's QK^T and AV);
norms, activations, gathers and scatters are elementwise and left out, which is also what
torch's FlopCounterMode counts (tests compare against it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class JointBlockLayout:
    """The parts of one MMDiT joint block that change its cost."""

    context_pre_only: bool = False  # last SD3 block: text side stops after its qkv
    image_self_attention: bool = False  # MMDiT-X (SD3.5-medium): second, image-only attention


def joint_block_macs(layout: JointBlockLayout, rows: int, txt: int, img_q: int, img_kv: int, dim: int,
                     mlp_ratio: float = 4.0, img_proj: int | None = None) -> int:
    """MACs of one joint block where img_q image tokens are recomputed and img_kv are attended to.

    img_proj: image tokens whose qkv projections run (default img_q; all tokens when the block
    refreshes every token's keys/values but queries only the recomputed ones).
    """
    hidden = int(dim * mlp_ratio)
    img_proj = img_q if img_proj is None else img_proj
    per_row = 0
    # Text stream: modulation, qkv, and (unless pre-only) output projection and MLP.
    per_row += dim * dim * (2 if layout.context_pre_only else 6)
    per_row += txt * 3 * dim * dim
    if not layout.context_pre_only:
        per_row += txt * (dim * dim + 2 * dim * hidden)
    # Image stream on the recomputed tokens.
    n_mod = 9 if layout.image_self_attention else 6
    per_row += dim * dim * n_mod
    per_row += img_proj * 3 * dim * dim + img_q * (dim * dim + 2 * dim * hidden)
    # Joint attention: every query (text + recomputed image) against all keys (text + all image).
    per_row += 2 * (txt + img_q) * (txt + img_kv) * dim
    if layout.image_self_attention:
        per_row += img_proj * 3 * dim * dim + img_q * dim * dim
        per_row += 2 * img_q * img_kv * dim
    return rows * per_row


@dataclass(frozen=True)
class MMDiTShape:
    """Sizes of the non-block parts of an SD3-style MMDiT (computed densely at every call)."""

    dim: int
    in_channels: int
    out_channels: int
    patch: int
    adm_dim: int  # pooled vector width (0 when absent)
    context_dim: int  # text feature width before the context embedder (0 when absent)
    freq_dim: int = 256


def mmdit_outer_macs(shape: MMDiTShape, rows: int, txt: int, img: int) -> int:
    """Patch embedding, timestep/pooled embedders, context embedder and final layer."""
    d, p = shape.dim, shape.patch
    per_row = img * shape.in_channels * p * p * d
    per_row += shape.freq_dim * d + d * d
    if shape.adm_dim:
        per_row += shape.adm_dim * d + d * d
    if shape.context_dim:
        per_row += txt * shape.context_dim * d
    per_row += 2 * d * d + img * d * p * p * shape.out_channels
    return rows * per_row


@dataclass(frozen=True)
class CallTokens:
    """The token counts of one model call that its MACs depend on beyond the layout: read once
    per call, from the first hooked block's arguments, so no block has to report them."""

    txt: int  # text tokens in the blocks' sequence
    img: int  # main image tokens (the ones pruning selects from)
    ref: int = 0  # reference image tokens (Kontext, Qwen-Image-Edit): never pruned
    extra_rows: int = 0  # modulation rows beyond the batch (Qwen-Image-Edit's index_timestep_zero)


@dataclass(frozen=True)
class CallShape:
    """Everything the MACs of one call depend on (shapes only); a layout caches its cost by it."""

    rows: int
    tokens: CallTokens
    context: tuple | None = None  # the host's text context shape
    computed: int | None = None  # main image tokens recomputed per row; None: all of them
    refresh_first_block: bool = False  # the first block projects keys/values of every image token

    def image_tokens(self, first: bool) -> tuple[int, int, int]:
        """(recomputed, attended, projected) image tokens (main + reference) of a block;
        first: the model's first block (the one refresh_first_block refreshes)."""
        t = self.tokens
        full = t.img + t.ref
        if self.computed is None:
            return full, full, full
        q = self.computed + t.ref
        return q, full, full if self.refresh_first_block and first else q


#: An adapter's cost model: CallShape -> [(module, computed MACs, dense MACs)] of the blocks and of
#: whatever outside them depends on the call's tokens beyond ModelInfo.outer_macs
CostModel = Callable[[CallShape], list]


def no_block_costs(shape: CallShape) -> list:
    return []


@dataclass
class MacLedger:
    """Running totals, per module kind, of computed and dense-equivalent MACs."""

    computed: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)

    def add(self, module: str, computed: int, dense: int) -> None:
        self.computed[module] = self.computed.get(module, 0) + computed
        self.dense[module] = self.dense.get(module, 0) + dense

    def merge(self, other: "MacLedger") -> None:
        for module in other.dense:
            self.add(module, other.computed.get(module, 0), other.dense[module])

    @property
    def total_computed(self) -> int:
        return sum(self.computed.values())

    @property
    def total_dense(self) -> int:
        return sum(self.dense.values())

    def saved_fraction(self) -> float:
        dense = self.total_dense
        return 0.0 if dense == 0 else 1.0 - self.total_computed / dense


#: SD3-medium at 1024² with CFG: the scale at which the README quotes MACs saved
SD3_MEDIUM = dict(depth=24, dim=1536, rows=2, txt=154, img=4096)


def sd3_call_macs(*, depth: int, dim: int, rows: int, txt: int, img: int, computed: int | None = None,
                  refresh_first_block: bool = False, adm_dim: int = 2048, context_dim: int = 4096) -> int:
    """One SD3 model call: dense (computed None), or `computed` image tokens recomputed per row."""
    shape = MMDiTShape(dim=dim, in_channels=16, out_channels=16, patch=2, adm_dim=adm_dim, context_dim=context_dim)
    total = mmdit_outer_macs(shape, rows, txt, img)
    for i in range(depth):
        layout = JointBlockLayout(context_pre_only=i == depth - 1)
        if computed is None:
            total += joint_block_macs(layout, rows, txt, img, img, dim)
        else:
            proj = img if refresh_first_block and i == 0 else None
            total += joint_block_macs(layout, rows, txt, computed, img, dim, img_proj=proj)
    return total


def projected_saving(settings, total_steps: int, scale: dict = SD3_MEDIUM) -> float:
    """MACs saved by a run of `total_steps` (one model call per step) with these settings, at `scale`."""
    from .schedule import StepPlan

    return projected_saving_of_modes(StepPlan.for_run(settings.warmup_steps, settings.cooldown_steps, total_steps).modes(), settings, scale)


def projected_saving_of_modes(modes, settings, scale: dict = SD3_MEDIUM) -> float:
    """MACs saved at `scale` by a run whose calls had these modes (CallMode or their values):
    what a measured run of the small fixture would save on the full-size model."""
    dense = sd3_call_macs(**scale)
    pruned = sd3_call_macs(**scale, computed=settings.token_budget(scale["img"]), refresh_first_block=settings.refresh_first_block)
    cost = {"pruned": pruned, "reuse": 0}
    computed = sum(cost.get(getattr(mode, "value", mode), dense) for mode in modes)
    return 1 - computed / (dense * len(modes)) if modes else 0.0
