"""Qwen-Image and Qwen-Image-Edit joint blocks under CAT pruning.

Plain torch: the host passes in what it needs (`QwenOps`), so this module never imports ComfyUI.

The hook follows ComfyUI's `patches_replace["dit"][("double_block", i)]` protocol for Qwen-Image:
args {"img", "txt", "vec", "pe", "transformer_options"}, extra {"original_block"}; returns
{"txt", "img"}. "img" is [main image ‖ reference images] (Edit: one run of tokens per reference
latent, counted in transformer_options["reference_image_num_tokens"]); `pe` has the rows of
[text ‖ main ‖ reference] in that order, the attention order.

Two inputs of the block are not in the hook's args: the text attention mask and
`timestep_zero_index` (Qwen-Image-Edit-2511's "index_timestep_zero": reference tokens modulated
at t = 0). The host reads them from the block call it hands over (`QwenOps.block_inputs`); the
index is also checked against the shapes (vec has twice the image rows exactly then).

A pruned call computes all text tokens, the selected main-image tokens and every reference token
(never pruned, like Kontext's); keys and values of every token are attended to, the unselected
main-image ones from the cache of their last refresh (roped keys, like the Flux adapter). The
block's own `_modulate` / `_apply_gate` do the modulation, with the selected rows' split point,
so per token the arithmetic is the block's own, in its order: keep 1.0 is exact.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..accounting import CallShape, CallTokens
from ..runtime import CallMode, ModelInfo
from .flux import (FluxBlockShape, FluxOuterShape, FluxPruningUnsupported, _attend_keys, _check_patches, _lean_part, _n_main,
                   double_block_macs, flux_outer_macs, linear_macs)
from .hooks import replace_hook
from .layers import LayerHost, LayerResolver

_QWEN_LAYERS = "comfy.ldm.qwen_image.model"


@dataclass(frozen=True)
class QwenOps:
    """The host's functions, so pruned and unpruned calls use the same kernels.

    apply_rope1(x, pe) -> x roped ([B, H, L, Dh]): the function the Qwen attention calls.
    attention(q, k, v, heads, mask, transformer_options) -> [B, Lq, H*Dh] on roped q/k in
        [B, H, L, Dh] layout (ComfyUI: qwen_image's optimized_attention_masked, skip_reshape).
    block_inputs(original_block) -> {"block", "encoder_hidden_states_mask",
        "timestep_zero_index"} that the model's own block call would use, or None if unknown.
    """

    apply_rope1: Callable
    attention: Callable
    block_inputs: Callable

    def apply_rope(self, q, k, pe):
        # the pair form flux._attend_keys calls (Qwen ropes query then key, each on its own)
        return self.apply_rope1(q, pe), self.apply_rope1(k, pe)


# ---------------------------------------------------------------------------------------------
# multiply-accumulates
# ---------------------------------------------------------------------------------------------
def block_shape(block) -> FluxBlockShape:
    """A Qwen joint block's cost, in the Flux double block's terms (the same structure)."""
    a = block.attn
    img_qkv = linear_macs(a.to_q) + linear_macs(a.to_k) + linear_macs(a.to_v)
    img = img_qkv + linear_macs(a.to_out) + linear_macs(block.img_mlp)
    txt = linear_macs(a.add_q_proj) + linear_macs(a.add_k_proj) + linear_macs(a.add_v_proj)
    txt += linear_macs(a.to_add_out) + linear_macs(block.txt_mlp)
    per_row = linear_macs(block.img_mod) + linear_macs(block.txt_mod)
    return FluxBlockShape(a.heads * a.dim_head, per_row, img, txt, img_qkv)


def outer_shape(dm) -> FluxOuterShape:
    """img_in + proj_out per image token, txt_in per text token, time embedding + norm_out per row."""
    per_row = linear_macs(dm.time_text_embed) + linear_macs(getattr(getattr(dm, "norm_out", None), "linear", None))
    return FluxOuterShape(per_row, linear_macs(dm.txt_in), linear_macs(dm.img_in) + linear_macs(getattr(dm, "proj_out", None)))


def describe(diffusion_model) -> ModelInfo:
    """Read the layout of a Qwen-Image transformer; TypeError for anything else."""
    dm = diffusion_model
    blocks = getattr(dm, "transformer_blocks", None)
    if blocks is None or not all(hasattr(dm, n) for n in ("img_in", "txt_in", "txt_norm", "time_text_embed", "pe_embedder")):
        raise TypeError(f"{type(dm).__name__} is not a Qwen-Image transformer (no transformer_blocks / img_in / txt_norm)")
    outer = outer_shape(dm)
    cost = QwenCost(tuple((block_shape(b), linear_macs(b.img_mod)) for b in blocks), outer.per_img_token,
                    linear_macs(dm.time_text_embed))
    return ModelInfo(arch="qwen_image", patch=int(dm.patch_size), num_blocks=len(blocks),
                     outer_macs=functools.partial(flux_outer_macs, outer), cost=cost)


@dataclass(frozen=True)
class QwenCost:
    """ModelInfo.cost: the joint blocks ((shape, image modulation MACs) each), and per call outside
    them the reference tokens' img_in + proj_out and the time embedding of the t = 0 rows
    (index_timestep_zero doubles the timesteps, and the blocks' image modulation rows)."""

    blocks: tuple
    ref_token_macs: int
    time_macs: int

    def __call__(self, shape: CallShape) -> list:
        rows, txt, extra = shape.rows, shape.tokens.txt, shape.tokens.extra_rows
        out = []
        macs = rows * shape.tokens.ref * self.ref_token_macs + extra * self.time_macs
        if macs:
            out.append(("reference_tokens", macs, macs))
        computed = dense = 0
        for i, (block, mod_macs) in enumerate(self.blocks):
            q, kv, proj = shape.image_tokens(first=i == 0)
            dense += double_block_macs(block, rows, txt, kv, kv) + extra * mod_macs
            computed += double_block_macs(block, rows, txt, q, kv, proj) + extra * mod_macs
        if self.blocks:
            out.append(("joint_blocks", computed, dense))
        return out


def call_tokens(ctx, args) -> CallTokens:
    """The call's token counts, from the first block's arguments (vec has twice the image rows
    with index_timestep_zero: the image modulation runs on them all)."""
    img, n_main = args["img"], ctx.layout.num_tokens
    return CallTokens(txt=args["txt"].shape[1], img=n_main, ref=max(0, img.shape[1] - n_main),
                      extra_rows=args["vec"].shape[0] - img.shape[0])


# ---------------------------------------------------------------------------------------------
# the block's submodules: as modules, or lean
# ---------------------------------------------------------------------------------------------
def _is_qwen_layer(module, name: str) -> bool:
    kind = type(module)
    return kind.__name__ == name and kind.__module__ == _QWEN_LAYERS


def _lean(module, layer: LayerResolver):
    """A lean function for Qwen's composite layers (FeedForward, GELU, eval Dropout), else Flux's."""
    if _is_qwen_layer(module, "FeedForward"):
        parts = [_lean(m, layer) for m in module.net]

        def feed_forward(x):
            for part in parts:
                x = part(x)
            return x
        return feed_forward
    if _is_qwen_layer(module, "GELU"):
        proj, approximate = layer(module.proj), module.approximate
        return lambda x: F.gelu(proj(x), approximate=approximate)
    if type(module) is torch.nn.Dropout and (not module.training or module.p == 0):
        return lambda x: x  # what F.dropout returns then: its input
    return _lean_part(module, layer)


class QwenBlockMath:
    """The submodules a pruned Qwen block calls, as modules or lean."""

    PARTS = {"img_mod": "img_mod", "txt_mod": "txt_mod", "img_norm1": "img_norm1", "img_norm2": "img_norm2",
             "txt_norm1": "txt_norm1", "txt_norm2": "txt_norm2", "img_mlp": "img_mlp", "txt_mlp": "txt_mlp",
             "to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v", "add_q": "attn.add_q_proj",
             "add_k": "attn.add_k_proj", "add_v": "attn.add_v_proj", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k",
             "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k", "to_out": "attn.to_out.0",
             "out_drop": "attn.to_out.1", "to_add_out": "attn.to_add_out"}

    def __init__(self, block, layer_host: LayerHost | None):
        layer = LayerResolver(layer_host) if layer_host is not None else None
        self.lean = layer is not None
        for name, path in self.PARTS.items():
            module = functools.reduce(lambda obj, attr: obj[int(attr)] if attr.isdigit() else getattr(obj, attr), path.split("."), block)
            setattr(self, name, module if layer is None else _lean(module, layer))
        self.module_layers = layer.modules if layer is not None else []


# ---------------------------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------------------------
def install(diffusion_model, ops: QwenOps, layer_host: LayerHost | None = None):
    """(ModelInfo, [(patch key, hook)]): one ("double_block", i) replace patch per block."""
    info = describe(diffusion_model)
    return info, [(("double_block", i), make_block_hook(block, i, ops, layer_host))
                  for i, block in enumerate(diffusion_model.transformer_blocks)]


def make_block_hook(block, index: int, ops: QwenOps, layer_host: LayerHost | None = None):
    """Dense calls (and calls without a CAT context) run the model's own block; the others are pruned."""
    return replace_hook(
        index, layer_host,
        tokens=call_tokens,
        build_math=lambda host: QwenBlockMath(block, host),
        pruned=lambda args, extra, ctx, math: pruned_block(block, index, args, extra, ctx, ops, math))


def _inputs(block, args, extra, ops: QwenOps, n_main: int, n_ref: int):
    """(text mask, timestep_zero_index) of the model's own block call, checked against the shapes."""
    found = ops.block_inputs(extra["original_block"])
    if found is None or found.get("block") is not block:
        raise FluxPruningUnsupported("cannot read the text attention mask and timestep_zero_index of this Qwen block call")
    tzi = found["timestep_zero_index"]
    rows, vec_rows = args["img"].shape[0], args["vec"].shape[0]
    expected = n_main if vec_rows == 2 * rows and n_ref else None
    if vec_rows not in (rows, 2 * rows) or tzi != expected:
        raise FluxPruningUnsupported(f"timestep_zero_index {tzi} with {vec_rows} modulation rows for {rows} image rows "
                                     f"and {n_main} + {n_ref} tokens")
    return found["encoder_hidden_states_mask"], tzi


def _text_mask(ctx, mask, rows: int, n_txt: int, n_keys: int, like: torch.Tensor):
    """Attention.forward's [B, 1, text + image] additive mask (built once per call)."""
    if mask is None:
        return None
    memo = ctx.adapter_state
    key = ("qwen_mask", id(mask), n_keys, like.dtype)
    out = memo.get(key)
    if out is None:
        out = torch.zeros((rows, 1, n_txt + n_keys), dtype=like.dtype, device=like.device)
        out[:, 0, :n_txt] = mask
        memo[key] = out
    return out


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def pruned_block(block, index: int, args: dict, extra: dict, ctx, ops: QwenOps, m: QwenBlockMath | None = None) -> dict:
    """One Qwen block on text + selected image + reference tokens, with cached keys/values.

    Follows QwenImageTransformerBlock.forward and its Attention.forward step by step. CAPTURE
    runs on the incoming tensors as the block does; PRUNED works on a gathered copy of the
    computed rows [selected ‖ reference] and scatters them back into the incoming image tensor.
    With refresh_first_block, block 0 projects keys/values of every image token.
    """
    img, txt, temb, pe, opts = args["img"], args["txt"], args["vec"], args["pe"], args["transformer_options"]
    _check_patches(opts)
    m = m or QwenBlockMath(block, None)
    capture = ctx.mode is CallMode.CAPTURE
    all_kv = capture or (ctx.refresh_first_block and index == 0)
    cache = ctx.layout.blocks[index]
    rows, n_img, _ = img.shape
    n_txt = txt.shape[1]
    n_main, n_ref = _n_main(ctx, n_img, opts)
    mask, tzi = _inputs(block, args, extra, ops, n_main, n_ref)
    if not capture and cache.k is None:
        raise FluxPruningUnsupported(f"Qwen block {index} has no cache")

    if capture:
        x, seq_idx, img_idx, n_sel = img, None, None, n_main
    else:
        img_idx = ctx.indices.computed(0, n_main, n_ref)  # the image stream [main | reference]
        seq_idx = ctx.indices.computed(n_txt, n_main, n_ref)  # the attention sequence [text | main | reference]
        x = img_idx.gather(img, 1)
        n_sel = ctx.index.shape[1]
    split = n_sel if tzi is not None else None  # reference rows start after the computed main rows

    img_mod_params = m.img_mod(temb)
    if tzi is not None:
        temb = temb.chunk(2, dim=0)[0]
    txt_mod_params = m.txt_mod(temb)
    img_mod1, img_mod2 = img_mod_params.chunk(2, dim=-1)
    txt_mod1, txt_mod2 = txt_mod_params.chunk(2, dim=-1)

    # image stream: the computed rows (every row up to its keys/values with all_kv)
    img_modulated, img_gate1 = block._modulate(m.img_norm1(img if all_kv else x), img_mod1, tzi if all_kv else split)
    txt_modulated, txt_gate1 = block._modulate(m.txt_norm1(txt), txt_mod1)
    heads = block.attn.heads
    img_q = _heads(m.to_q(img_modulated), heads).contiguous()
    img_k = _heads(m.to_k(img_modulated), heads).contiguous()
    img_v = _heads(m.to_v(img_modulated), heads)
    del img_modulated
    txt_q = _heads(m.add_q(txt_modulated), heads).contiguous()
    txt_k = _heads(m.add_k(txt_modulated), heads).contiguous()
    txt_v = _heads(m.add_v(txt_modulated), heads)
    del txt_modulated
    img_q, img_k = m.norm_q(img_q), m.norm_k(img_k)
    txt_q, txt_k = m.norm_added_q(txt_q), m.norm_added_k(txt_k)
    q = torch.cat([txt_q, img_q], dim=2)
    k = torch.cat([txt_k, img_k], dim=2)
    v = torch.cat([txt_v, img_v], dim=2)
    del txt_q, img_q, txt_k, img_k, txt_v, img_v

    attn_mask = _text_mask(ctx, mask, rows, n_txt, n_img, x)
    q, k, v = _attend_keys(cache, q, k, v, pe, seq_idx, ops, all_kv)
    if all_kv and not capture:
        q = seq_idx.gather(q, 2)
    attn = ops.attention(q, k, v, heads, attn_mask, opts)
    del q, k, v

    txt_attn, img_attn = attn[:, :n_txt, :], attn[:, n_txt:, :]
    img_attn = m.out_drop(m.to_out(img_attn))
    txt_attn = m.to_add_out(txt_attn)

    x = block._apply_gate(img_attn, x, img_gate1, split)
    txt = txt + txt_gate1 * txt_attn
    del img_attn, txt_attn, img_gate1, txt_gate1

    img_modulated2, img_gate2 = block._modulate(m.img_norm2(x), img_mod2, split)
    x = block._apply_gate(m.img_mlp(img_modulated2), x, img_gate2, split)
    del img_modulated2
    txt_modulated2, txt_gate2 = block._modulate(m.txt_norm2(txt), txt_mod2)
    txt = torch.addcmul(txt, txt_gate2, m.txt_mlp(txt_modulated2))

    if not capture:
        x = img_idx.scatter_back(img, 1, x)
    return {"txt": txt, "img": x}
