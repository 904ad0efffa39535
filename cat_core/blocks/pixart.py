"""PixArt-α / PixArt-Σ blocks (ComfyUI's PixArtMS) under CAT pruning.

PixArtMS's block loop has no replace patch and passes no per-call options, so each block is
reached through its `forward` (an object patch on `diffusion_model.blocks.N.forward`: the block
module, its weight keys and any LoRA patched into it stay where they are). The replacement
reads the call context from `model_call.ACTIVE_CALL`; with none, or in a dense call, it is the
block's own forward.

A block is self-attention over image tokens, cross-attention to the (T5) text, and an MLP, all
modulated by adaLN-single (`t_block`, computed once by the model, plus each block's
`scale_shift_table`). On a pruned call only the selected image tokens go through the block:
their queries attend over the cached keys/values of every image token (their own rows fresh),
and cross-attention and MLP act per token. Blocks that compress keys/values (sr_ratio > 1)
attend over pooled tokens that mix selected and stale rows, so such models are refused.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from ..accounting import CallShape, CallTokens
from ..model_call import ACTIVE_CALL
from ..runtime import CallMode, ModelInfo
from .hooks import run_block
from .layers import LayerHost, LayerResolver


class KVCompressionError(ValueError):
    """A PixArt model whose self-attention pools keys/values (PixArt-Σ KV compression)."""


# ------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class PixArtShape:
    """Sizes of a PixArtMS (what its MACs depend on)."""

    dim: int
    hidden: int  # MLP width
    in_channels: int
    out_channels: int
    patch: int
    caption_channels: int
    micro_condition: bool
    freq_dim: int = 256


def block_macs(shape: PixArtShape, rows: int, txt: int, img_q: int, img_kv: int, img_proj: int | None = None) -> int:
    """MACs of one block where img_q image tokens are recomputed and img_kv are attended to.

    img_proj: image tokens whose qkv projection runs (default img_q; all of them when the block
    refreshes every token's keys/values but queries only the recomputed ones).
    """
    d = shape.dim
    img_proj = img_q if img_proj is None else img_proj
    per_row = img_proj * 3 * d * d + 2 * img_q * img_kv * d + img_q * d * d  # self-attention
    per_row += img_q * d * d + txt * 2 * d * d + 2 * img_q * txt * d + img_q * d * d  # cross-attention
    per_row += img_q * 2 * d * shape.hidden  # MLP
    return rows * per_row


def outer_macs(shape: PixArtShape, rows: int, txt: int, img: int) -> int:
    """Patch embedding, timestep / size embedders, t_block, caption projection and final layer."""
    d, p = shape.dim, shape.patch
    per_row = img * shape.in_channels * p * p * d
    per_row += shape.freq_dim * d + d * d + d * 6 * d
    if shape.micro_condition:  # csize (2 values) and aspect ratio (1 value), each a 2-layer MLP to d // 3
        third = d // 3
        per_row += 3 * (shape.freq_dim * third + third * third)
    per_row += txt * (shape.caption_channels * d + d * d)
    per_row += img * d * p * p * shape.out_channels
    return rows * per_row


def describe(diffusion_model) -> tuple[ModelInfo, PixArtShape]:
    """Read the layout of a PixArtMS; raises TypeError for anything else and KVCompressionError for
    blocks with key/value token compression."""
    dm = diffusion_model
    blocks = getattr(dm, "blocks", None)
    if blocks is None or not hasattr(dm, "t_block") or not hasattr(dm, "y_embedder"):
        raise TypeError(f"{type(dm).__name__} is not a PixArt model (no blocks / t_block)")
    compressed = [i for i, b in enumerate(blocks) if getattr(b.attn, "sr_ratio", 1) > 1]
    if compressed:
        raise KVCompressionError(
            f"this PixArt model compresses self-attention keys/values (sr_ratio {blocks[compressed[0]].attn.sr_ratio} "
            f"in blocks {compressed}): its pooled keys mix recomputed and cached tokens, so CAT Pruning cannot prune it")
    shape = PixArtShape(
        dim=dm.hidden_size, hidden=blocks[0].mlp.fc1.out_features, in_channels=dm.in_channels,
        out_channels=dm.out_channels, patch=dm.patch_size, caption_channels=dm.y_embedder.y_proj.fc1.in_features,
        micro_condition=bool(dm.micro_conditioning))
    info = ModelInfo(arch="pixart", patch=dm.patch_size, num_blocks=len(blocks), outer_macs=functools.partial(outer_macs, shape),
                     cost=functools.partial(call_cost, shape, len(blocks)))
    return info, shape


def call_cost(shape: PixArtShape, depth: int, call: CallShape) -> list:
    """ModelInfo.cost: the `depth` blocks of one call."""
    rows, txt = call.rows, call.tokens.txt
    computed = dense = 0
    for i in range(depth):
        q, kv, proj = call.image_tokens(first=i == 0)
        dense += block_macs(shape, rows, txt, kv, kv)
        computed += block_macs(shape, rows, txt, q, kv, img_proj=proj)
    return [("pixart_blocks", computed, dense)]


def call_tokens(x, y) -> CallTokens:
    """The call's token counts, from the first block's inputs (y: [1, B * T, C] packed or [B, T, C])."""
    rows = x.shape[0]
    return CallTokens(txt=y.shape[1] // rows if y.shape[0] == 1 else y.shape[1], img=x.shape[1])


# ------------------------------------------------------------------------------ block math
def _modulate(x, shift, scale):
    # blocks.t2i_modulate, the same arithmetic
    return x * (1 + scale) + shift


class PixArtBlockMath:
    """The layers of one PixArtMSBlock as callables: its modules, or lean functions (layers.py)."""

    def __init__(self, block, layer=None):
        self.lean = layer is not None
        f = layer if layer is not None else (lambda m: m)
        attn, cross, mlp = block.attn, block.cross_attn, block.mlp
        self.heads, self.cross_heads = attn.num_heads, cross.num_heads
        self.norm1, self.norm2 = f(block.norm1), f(block.norm2)
        self.qkv, self.q_norm, self.k_norm, self.proj = f(attn.qkv), f(attn.q_norm), f(attn.k_norm), f(attn.proj)
        self.q_linear, self.kv_linear, self.cross_proj = f(cross.q_linear), f(cross.kv_linear), f(cross.proj)
        self.fc1, self.act, self.mlp_norm, self.fc2 = f(mlp.fc1), f(mlp.act), f(mlp.norm), f(mlp.fc2)
        self.module_layers = layer.modules if layer is not None else []

    @staticmethod
    def supports(block) -> bool:
        """The layout this class mirrors (PixArtMSBlock in eval, dropouts off); else refuse to prune."""
        mlp, cross = block.mlp, block.cross_attn
        if block.training or not all(hasattr(mlp, n) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")):
            return False
        return all(d.p == 0 for d in (mlp.drop1, mlp.drop2, cross.attn_drop, cross.proj_drop))

    def modulations(self, block, x, t):
        b = x.shape[0]
        return (block.scale_shift_table[None].to(dtype=x.dtype, device=x.device) + t.reshape(b, 6, -1)).chunk(6, dim=1)

    def qkv_rows(self, x, shift, scale):
        """(q, k, v) [B, n, C] of the rows of x, after q_norm / k_norm (AttentionKVCompress.forward)."""
        b, n, c = x.shape
        q, k, v = self.qkv(_modulate(self.norm1(x), shift, scale)).reshape(b, n, 3, c).unbind(2)
        return self.q_norm(q), self.k_norm(k), v

    def self_attention(self, attention, q, k, v):
        b, n, c = q.shape
        heads = self.heads
        q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return self.proj(attention(q, k, v, heads, True).view(b, n, c))

    def cross_attention(self, attention, x, y):
        # MultiHeadCrossAttention.forward (y: [1, B * T, C], the model's packed text)
        b, n, c = x.shape
        heads, dh = self.cross_heads, c // self.cross_heads
        q = self.q_linear(x).view(1, -1, heads, dh)
        k, v = self.kv_linear(y).view(1, -1, 2, heads, dh).unbind(2)
        return self.cross_proj(attention(q.view(b, -1, c), k.view(b, -1, c), v.view(b, -1, c), self.cross_heads, False))

    def mlp(self, x, shift, scale):
        return self.fc2(self.mlp_norm(self.act(self.fc1(_modulate(self.norm2(x), shift, scale)))))


def pruned_block(block, math: PixArtBlockMath, block_index: int, x, y, t, ctx, attention):
    """One block on the selected image tokens, attending over cached keys/values.

    CAPTURE computes every token and stores the keys/values; PRUNED gathers the selected rows,
    scatters their fresh keys/values into the cache and writes their outputs back into the
    incoming full-length tensor (the other rows are stale, and their model output is replaced by
    the cached one). With refresh_first_block the first block projects keys/values of every
    token (its input is exact for all of them) and carries only the selected rows on.
    """
    cache = ctx.layout.blocks[block_index]
    capture = ctx.mode is CallMode.CAPTURE
    all_kv = capture or (ctx.refresh_first_block and block_index == 0)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = math.modulations(block, x, t)
    selected = None if capture else ctx.indices.selection()
    rows = x if all_kv else _like(x, selected.gather(x, 1))
    q, k, v = math.qkv_rows(rows, shift_msa, scale_msa)
    if capture:
        cache.k, cache.v = k.contiguous(), v.contiguous()
        keys, values = k, v
    else:
        if all_kv:
            cache.k.copy_(k)
            cache.v.copy_(v)
            rows, q = _like(x, selected.gather(x, 1)), selected.gather(q, 1)
        else:
            selected.scatter_back(cache.k, 1, k)
            selected.scatter_back(cache.v, 1, v)
        keys, values = cache.k, cache.v
    out = rows + gate_msa * math.self_attention(attention, q, keys, values)
    out = out + math.cross_attention(attention, out, y)
    out = out + gate_mlp * math.mlp(out, shift_mlp, scale_mlp)
    if not capture:
        out = selected.scatter_back(x, 1, out)
    return out


def _like(ref: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows in ref's memory layout. PixArtMS's tokens come out of the patch embedding as a
    transposed view, and every layer keeps that layout; a matmul's rounding can depend on it."""
    order = sorted(range(ref.dim()), key=lambda d: -ref.stride(d))
    if order == list(range(ref.dim())):
        return rows
    inverse = [order.index(d) for d in range(ref.dim())]
    return rows.permute(order).contiguous().permute(inverse)


# ------------------------------------------------------------------------------ install
def install(diffusion_model, attention, layer_host: LayerHost | None = None):
    """(ModelInfo, [], [(object path, forward)]): one forward replacement per block.

    attention(q, k, v, heads, skip_reshape) -> [B, L, C]: the host's attention as PixArt's
    blocks call it (so pruned and unpruned calls use the same kernel).
    """
    info, _ = describe(diffusion_model)
    patches = [(f"diffusion_model.blocks.{i}.forward", make_block_forward(block, i, attention, layer_host))
               for i, block in enumerate(diffusion_model.blocks)]
    return info, [], patches


def make_block_forward(block, block_index: int, attention, layer_host: LayerHost | None = None):
    """The forward that replaces block `block_index`'s: its own unless a capture or pruned call is active."""
    original = types.MethodType(type(block).forward, block)  # the class's, never an earlier patch

    def build(host):
        return PixArtBlockMath(block, LayerResolver(host) if host is not None else None)

    def pruned(math, x, y, t, mask, kwargs, ctx):
        if mask is not None or kwargs or not PixArtBlockMath.supports(block):
            raise NotImplementedError("PixArt block called with a text mask, extra arguments or dropout")
        return pruned_block(block, math, block_index, x, y, t, ctx, attention)

    def forward(x, y, t, mask=None, HW=None, **kwargs):
        ctx = ACTIVE_CALL.get()
        return run_block(ctx, block_index, layer_host, lambda: original(x, y, t, mask, HW, **kwargs),
                         lambda c: call_tokens(x, y), build, lambda math: pruned(math, x, y, t, mask, kwargs, ctx))

    forward.cat_block_index = block_index
    return forward
