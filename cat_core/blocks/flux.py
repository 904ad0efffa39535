"""Flux (dev / schnell / Kontext, and the rest of ComfyUI's Flux class) and Chroma blocks under CAT pruning.

The same block math serves every model built from ComfyUI's Flux blocks (`comfy.ldm.flux.layers`
DoubleStreamBlock / SingleStreamBlock): HunyuanImage 2.1 (blocks/hunyuan.py) reuses it with its
own cost model.

Plain torch: the host passes in what it needs (`FluxOps`: ComfyUI's RoPE, attention and
modulation functions), so this module never imports ComfyUI.

The hooks follow ComfyUI's `patches_replace["dit"]` protocol for Flux-style models:

- `("double_block", i)`: args {"img", "txt", "vec", "pe", "attn_mask", "transformer_options"},
  extra {"original_block"}; returns {"img", "txt"}. "img" is [main image ‖ reference tokens].
- `("single_block", i)`: args {"img", "vec", "pe", "attn_mask", "transformer_options"} where
  "img" is [text ‖ main image ‖ reference tokens]; returns {"img"}.
HunyuanVideo's class passes the mask as "attention_mask" (a [1, 1, L] bias over keys: text
padding) and adds "modulation_dims_img" / "_txt" / "modulation_dims" (set only for a guiding video
frame: such calls are not pruned).

Token sequence of one call (attention order, also the order of `pe` rows and of the caches):
    [ text (n_txt) | main image (n_main, row-major patch grid) | reference images (n_ref) ]
A pruned call computes all text tokens, the selected main-image tokens and all reference
(Kontext) tokens; keys/values of every token are attended to, unselected main-image tokens'
ones coming from the cache of their last refresh. Reference tokens are never pruned.

RoPE: ComfyUI's Flux attention applies RoPE to q and k inside `attention()`. Here q and k of
the computed tokens are roped with the rows of `pe` gathered for exactly those tokens, the
roped keys are scattered into the cache (which therefore holds roped keys), and the raw
attention runs with the full key set. Per token this is the same arithmetic, in the same
order, as the block's own forward, so keep_ratio 1.0 reproduces the unpatched model exactly.

Flux blocks add into their inputs in place. CAPTURE runs on the incoming tensors exactly as
the block does; PRUNED works on gathered copies and scatters the results back into the
incoming tensor. Cached tensors are never handed to a block or returned.
"""
from __future__ import annotations

import functools
import math
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..accounting import CallShape, CallTokens
from ..runtime import CallMode, ModelInfo
from .hooks import replace_hook
from ..indices import IndexSet
from .layers import LayerHost, LayerResolver

# Chroma's forward_orig embeds this many modulation indices through its approximator per row.
CHROMA_MOD_INDEX_LENGTH = 344

# Hooks on patches ComfyUI applies inside Flux attention: a pruned call cannot honour them.
_ATTN_PATCHES = ("attn1_patch", "attn1_output_patch")


class FluxPruningUnsupported(RuntimeError):
    """This call cannot run pruned (the host then finishes the run without pruning)."""


@dataclass(frozen=True)
class FluxOps:
    """The host's functions, so pruned and unpruned calls use the same kernels.

    apply_rope(q, k, pe) -> (q, k): ComfyUI's `comfy.ldm.flux.math.apply_rope`.
    attention(q, k, v, heads, mask, transformer_options) -> [B, Lq, H*Dh] on already-roped
        q/k in [B, H, L, Dh] layout (ComfyUI: the `optimized_attention` that flux.math bound,
        with skip_reshape=True).
    apply_mod(tensor, mult, add=None, modulation_dims=None): `comfy.ldm.flux.layers.apply_mod`.
    """

    apply_rope: Callable
    attention: Callable
    apply_mod: Callable


# ---------------------------------------------------------------------------------------------
# multiply-accumulates
# ---------------------------------------------------------------------------------------------
def linear_macs(module) -> int:
    """Per-token MACs of every linear layer inside `module` (in_features * out_features each),
    and of patch convolutions (per output position: in_channels / groups * kernel * out_channels)."""
    if module is None:
        return 0
    total = 0
    for m in module.modules():
        fin, fout = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if isinstance(fin, int) and isinstance(fout, int):
            total += fin * fout
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            total += m.in_channels // m.groups * math.prod(m.kernel_size) * m.out_channels
    return total


@dataclass(frozen=True)
class FluxBlockShape:
    """Cost of one Flux double or single block.

    per_row: modulation linears, once per batch row (0 when the model passes modulations in)
    per_img_token / per_txt_token: linear layers per token of the image / text stream
    dim: hidden size (attention: QK^T and AV are each one `dim`-long product per query-key pair)
    per_img_qkv: the image stream's qkv projection per token (part of per_img_token; double blocks)
    """

    dim: int
    per_row: int
    per_img_token: int
    per_txt_token: int
    per_img_qkv: int = 0


def double_block_shape(block) -> FluxBlockShape:
    per_row = linear_macs(block.img_mod) + linear_macs(block.txt_mod) if getattr(block, "modulation", False) else 0
    img = linear_macs(block.img_attn.qkv) + linear_macs(block.img_attn.proj) + linear_macs(block.img_mlp)
    txt = linear_macs(block.txt_attn.qkv) + linear_macs(block.txt_attn.proj) + linear_macs(block.txt_mlp)
    return FluxBlockShape(block.hidden_size, per_row, img, txt, linear_macs(block.img_attn.qkv))


def single_block_shape(block) -> FluxBlockShape:
    per_row = linear_macs(block.modulation) if block.modulation is not None else 0
    per_token = linear_macs(block.linear1) + linear_macs(block.linear2)
    return FluxBlockShape(block.hidden_size, per_row, per_token, per_token)


def double_block_macs(shape: FluxBlockShape, rows: int, txt: int, img_q: int, img_kv: int, img_proj: int | None = None) -> int:
    """One double block: img_q image tokens (main + reference) recomputed, img_kv attended to.

    img_proj: image tokens whose qkv projection runs, when more than img_q (the first block
    refreshing every token's keys/values).
    """
    per_row = shape.per_row + txt * shape.per_txt_token + img_q * shape.per_img_token
    if img_proj is not None:
        per_row += (img_proj - img_q) * shape.per_img_qkv
    per_row += 2 * (txt + img_q) * (txt + img_kv) * shape.dim
    return rows * per_row


def single_block_macs(shape: FluxBlockShape, rows: int, txt: int, img_q: int, img_kv: int) -> int:
    """One single block on [text ‖ image] with img_q image tokens recomputed, img_kv attended to."""
    per_row = shape.per_row + txt * shape.per_txt_token + img_q * shape.per_img_token
    per_row += 2 * (txt + img_q) * (txt + img_kv) * shape.dim
    return rows * per_row


@dataclass(frozen=True)
class FluxOuterShape:
    """Cost of everything outside the blocks, computed densely at every call.

    per_row: timestep / vector / guidance embedders, the final layer's adaLN, global
        modulations (Flux.2), or Chroma's modulation approximator (344 embeddings per row)
    per_txt_token: txt_in; per_img_token: img_in + the final linear layer
    """

    per_row: int
    per_txt_token: int
    per_img_token: int


def flux_outer_macs(shape: FluxOuterShape, rows: int, txt: int, img: int) -> int:
    """Patch/text embedding, time/vector/guidance embedders (or Chroma's approximator), final layer."""
    return rows * (shape.per_row + txt * shape.per_txt_token + img * shape.per_img_token)


def outer_shape(diffusion_model) -> FluxOuterShape:
    dm = diffusion_model
    final = getattr(dm, "final_layer", None)
    per_img = linear_macs(dm.img_in) + (linear_macs(final.linear) if final is not None else 0)
    per_txt = linear_macs(dm.txt_in)
    if _is_chroma(dm):
        per_row = CHROMA_MOD_INDEX_LENGTH * linear_macs(dm.distilled_guidance_layer)
    else:
        per_row = linear_macs(dm.time_in) + linear_macs(getattr(dm, "vector_in", None))
        if getattr(dm.params, "guidance_embed", False):
            per_row += linear_macs(dm.guidance_in)
        if final is not None:
            per_row += linear_macs(final.adaLN_modulation)
        for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
            per_row += linear_macs(getattr(dm, name, None))
    return FluxOuterShape(per_row, per_txt, per_img)


def _is_chroma(dm) -> bool:
    return hasattr(dm, "distilled_guidance_layer")


def describe(diffusion_model) -> ModelInfo:
    """Read the layout of a Flux-style model (Flux, Flux Kontext, Chroma); TypeError otherwise."""
    dm = diffusion_model
    doubles, singles = getattr(dm, "double_blocks", None), getattr(dm, "single_blocks", None)
    if doubles is None or singles is None or not hasattr(dm, "img_in") or not hasattr(dm, "txt_in"):
        raise TypeError(f"{type(dm).__name__} is not a Flux-style model (no double_blocks / single_blocks / img_in)")
    arch = "chroma" if _is_chroma(dm) else "flux"
    return ModelInfo(arch=arch, patch=int(dm.patch_size), num_blocks=len(doubles) + len(singles),
                     outer_macs=functools.partial(flux_outer_macs, outer_shape(dm)),
                     cost=FluxCost.of(dm, reference_call_macs(reference_token_macs(dm))))


def reference_token_macs(diffusion_model) -> int:
    """Per reference token and row: img_in and the final layer also run on Kontext tokens."""
    return outer_shape(diffusion_model).per_img_token


#: call_macs(shape) -> [(module, MACs)]: what a call computes outside the blocks that depends on
#: its token counts beyond ModelInfo.outer_macs (never pruned: computed = dense).
CallMacs = Callable[[CallShape], list]


def reference_call_macs(ref_token_macs: int) -> CallMacs:
    """Flux: img_in and the final layer on the reference (Kontext) tokens."""
    def count(shape: CallShape) -> list:
        n_ref = shape.tokens.ref
        return [("reference_tokens", shape.rows * n_ref * ref_token_macs)] if n_ref and ref_token_macs else []
    return count


@dataclass(frozen=True)
class FluxCost:
    """ModelInfo.cost of a model built from Flux blocks: double and single blocks, plus call_macs."""

    doubles: tuple
    singles: tuple
    call_macs: CallMacs | None = None

    @classmethod
    def of(cls, diffusion_model, call_macs: CallMacs | None) -> "FluxCost":
        return cls(tuple(double_block_shape(b) for b in diffusion_model.double_blocks),
                   tuple(single_block_shape(b) for b in diffusion_model.single_blocks), call_macs)

    def __call__(self, shape: CallShape) -> list:
        rows, txt = shape.rows, shape.tokens.txt
        out = [(module, macs, macs) for module, macs in (self.call_macs(shape) if self.call_macs is not None else ())]
        computed = dense = 0
        for i, block in enumerate(self.doubles):
            q, kv, proj = shape.image_tokens(first=i == 0)
            dense += double_block_macs(block, rows, txt, kv, kv)
            computed += double_block_macs(block, rows, txt, q, kv, proj)
        if self.doubles:
            out.append(("double_blocks", computed, dense))
        computed = dense = 0
        for block in self.singles:
            q, kv, _ = shape.image_tokens(first=False)
            dense += single_block_macs(block, rows, txt, kv, kv)
            computed += single_block_macs(block, rows, txt, q, kv)
        if self.singles:
            out.append(("single_blocks", computed, dense))
        return out


def _n_main(ctx, n_img: int, transformer_options) -> tuple[int, int]:
    """Main-image and reference token counts of an image stream of n_img tokens."""
    n_main = ctx.layout.num_tokens
    n_ref = n_img - n_main
    refs = transformer_options.get("reference_image_num_tokens")
    expected = sum(refs) if refs else 0
    if n_ref < 0 or n_ref != expected:
        raise FluxPruningUnsupported(
            f"image stream has {n_img} tokens; expected {n_main} image + {expected} reference tokens")
    return n_main, n_ref


def _modulation_dims(mod, main_rows: int, n_ref: int, lead: int = 0):
    """Per-token modulation ranges (Flux.2 'index_timestep_zero': reference tokens use t=0).

    Mirrors Flux.forward_orig: rows before the reference tokens use modulation 0, the
    reference tokens modulation 1. None when the modulation is the same for every token.
    """
    if mod.shift.dim() < 3 or mod.shift.shape[1] == 1:
        return None
    if n_ref == 0:
        raise FluxPruningUnsupported("per-token modulation without reference tokens")
    end = lead + main_rows
    return [(0, end, 0), (end, end + n_ref, 1)]


def _hook_mask(args):
    """The block's attention mask: Flux passes "attn_mask", HunyuanVideo "attention_mask"."""
    return args["attn_mask"] if "attn_mask" in args else args.get("attention_mask")


def _check_given_dims(args) -> None:
    """HunyuanVideo hands per-token modulation ranges to its blocks (a guiding frame, video only)."""
    for key in ("modulation_dims_img", "modulation_dims_txt", "modulation_dims"):
        if args.get(key) is not None:
            raise FluxPruningUnsupported(f"per-token modulation ranges from the model ({key})")


def _check_patches(opts) -> None:
    patches = opts.get("patches", {})
    for name in _ATTN_PATCHES:
        if patches.get(name):
            raise FluxPruningUnsupported(f"transformer patch {name!r} is installed")


# ---------------------------------------------------------------------------------------------
# the blocks' submodules: as modules, or lean (comfy/ldm/flux/layers.py's arithmetic, resolved layers)
# ---------------------------------------------------------------------------------------------
_ModulationOut = namedtuple("_ModulationOut", "shift scale gate")
_FLUX_LAYERS = "comfy.ldm.flux.layers"


def _is_flux_layer(module, name: str) -> bool:
    kind = type(module)
    return kind.__name__ == name and kind.__module__ == _FLUX_LAYERS


def _lean_part(module, layer: LayerResolver):
    """A lean function for one of the Flux blocks' composite submodules, else `layer(module)`."""
    if _is_flux_layer(module, "Modulation"):
        lin, multiplier, double = layer(module.lin), module.multiplier, module.is_double

        def modulation(vec):
            if vec.ndim == 2:
                vec = vec[:, None, :]
            out = lin(F.silu(vec)).chunk(multiplier, dim=-1)
            return _ModulationOut(*out[:3]), _ModulationOut(*out[3:]) if double else None
        return modulation
    if _is_flux_layer(module, "QKNorm"):
        query_norm, key_norm = layer(module.query_norm), layer(module.key_norm)

        def qk_norm(q, k, v):
            q, k = query_norm(q), key_norm(k)
            if q.dtype == v.dtype and q.device == v.device and k.dtype == v.dtype and k.device == v.device:
                return q, k  # what .to(v) returns then, without two dispatches
            return q.to(v), k.to(v)
        return qk_norm
    if _is_flux_layer(module, "YakMLP"):
        gate, up, down, act = (layer(m) for m in (module.gate_proj, module.up_proj, module.down_proj, module.act_fn))
        return lambda x: down(act(gate(x)) * up(x))
    if _is_flux_layer(module, "SiLUActivation"):
        silu = layer(module.gate_fn)

        def silu_gate(x):
            x1, x2 = x.chunk(2, dim=-1)
            return silu(x1) * x2
        return silu_gate
    if type(module) is torch.nn.Sequential:
        parts = [_lean_part(m, layer) for m in module]

        def sequential(x):
            for part in parts:
                x = part(x)
            return x
        return sequential
    return layer(module)


class FluxBlockMath:
    """The submodules a pruned Flux double or single block calls, as modules or lean."""

    DOUBLE = {"img_mod": "img_mod", "txt_mod": "txt_mod", "img_norm1": "img_norm1", "img_qkv": "img_attn.qkv",
              "img_qk_norm": "img_attn.norm", "img_proj": "img_attn.proj", "img_norm2": "img_norm2", "img_mlp": "img_mlp",
              "txt_norm1": "txt_norm1", "txt_qkv": "txt_attn.qkv", "txt_qk_norm": "txt_attn.norm",
              "txt_proj": "txt_attn.proj", "txt_norm2": "txt_norm2", "txt_mlp": "txt_mlp"}
    SINGLE = {"mod": "modulation", "pre_norm": "pre_norm", "linear1": "linear1", "qk_norm": "norm",
              "mlp_act": "mlp_act", "linear2": "linear2"}

    def __init__(self, block, layer_host: LayerHost | None):
        names = self.DOUBLE if hasattr(block, "img_attn") else self.SINGLE
        layer = LayerResolver(layer_host) if layer_host is not None else None
        self.lean = layer is not None
        for name, path in names.items():
            module = functools.reduce(lambda obj, attr: getattr(obj, attr, None), path.split("."), block)
            if not isinstance(module, torch.nn.Module):  # modulation passed in by the model (Flux.2, Chroma)
                module = None
            setattr(self, name, None if module is None else _lean_part(module, layer) if layer is not None else module)
        self.module_layers = layer.modules if layer is not None else []


# ---------------------------------------------------------------------------------------------
# double blocks
# ---------------------------------------------------------------------------------------------
def install(diffusion_model, ops: FluxOps, layer_host: LayerHost | None = None):
    """(ModelInfo, [(patch key, hook)]): ("double_block", i) and ("single_block", i) replace
    patches; single blocks' cache slots follow the double blocks'."""
    info = describe(diffusion_model)
    return info, block_hooks(diffusion_model, ops, layer_host)


def block_hooks(diffusion_model, ops: FluxOps, layer_host: LayerHost | None = None) -> list:
    """[(patch key, hook)] for every double and single block of a model built from ComfyUI's
    Flux blocks (Flux, Chroma, HunyuanVideo's class); single blocks' cache slots follow the
    double blocks'."""
    n_double = len(diffusion_model.double_blocks)
    hooks = [(("double_block", i), make_double_block_hook(block, i, ops, layer_host))
             for i, block in enumerate(diffusion_model.double_blocks)]
    hooks += [(("single_block", i), make_single_block_hook(block, n_double + i, ops, layer_host))
              for i, block in enumerate(diffusion_model.single_blocks)]
    return hooks


def make_double_block_hook(block, index: int, ops: FluxOps, layer_host: LayerHost | None = None):
    """Replace patch for double block `index` (its cache slot is `index`).

    layer_host: turns the host's layers into plain functions for the lean path (None: modules).
    """
    return _make_hook(block, index, ops, _double_tokens, pruned_double_block, layer_host)


def _make_hook(block, cache_index, ops, tokens, run_pruned, layer_host):
    """Dense calls (and calls without a CAT context) run the bare block; the others are pruned."""
    return replace_hook(
        cache_index, layer_host,
        tokens=tokens,
        build_math=lambda host: FluxBlockMath(block, host),
        pruned=lambda args, extra, ctx, math: run_pruned(block, cache_index, args, ctx, ops, math))


def _double_tokens(ctx, args) -> CallTokens:
    """The call's token counts, from a double block's [main image | reference] and text streams."""
    n_main = ctx.layout.num_tokens
    return CallTokens(txt=args["txt"].shape[1], img=n_main, ref=max(0, args["img"].shape[1] - n_main))


def pruned_double_block(block, index: int, args: dict, ctx, ops: FluxOps, m: FluxBlockMath | None = None) -> dict:
    """One double block on text + selected image + reference tokens, with cached keys/values.

    Follows DoubleStreamBlock.forward step by step (same submodules, same order). With
    refresh_first_block, block 0 projects keys/values of every image token (its input is exact
    for all of them) and queries and carries on only the computed tokens.
    """
    img, txt, vec, pe, mask, opts = args["img"], args["txt"], args["vec"], args["pe"], _hook_mask(args), args["transformer_options"]
    _check_patches(opts)
    _check_given_dims(args)
    m = m or FluxBlockMath(block, None)
    capture = ctx.mode is CallMode.CAPTURE
    all_kv = capture or (ctx.refresh_first_block and index == 0)
    cache = ctx.layout.blocks[index]
    rows, n_img, _ = img.shape
    n_txt = txt.shape[1]
    n_main, n_ref = _n_main(ctx, n_img, opts)
    if not capture and cache.k is None:
        raise FluxPruningUnsupported(f"double block {index} has no cache")

    if block.modulation:
        img_mod1, img_mod2 = m.img_mod(vec)
        txt_mod1, txt_mod2 = m.txt_mod(vec)
    else:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec

    if capture:
        x, seq_idx, img_idx, n_sel = img, None, None, n_main
    else:
        img_idx = ctx.indices.computed(0, n_main, n_ref)  # the image stream [main | reference]
        seq_idx = ctx.indices.computed(n_txt, n_main, n_ref)  # the attention sequence [text | main | reference]
        x = img_idx.gather(img, 1)
        n_sel = ctx.index.shape[1]
    dims_img = _modulation_dims(img_mod1, n_sel, n_ref)
    dims_txt = None  # forward_orig never passes per-token text modulation

    # image stream (computed tokens only; every token up to its keys/values with all_kv)
    x_mod = m.img_norm1(img if all_kv else x)
    x_mod = ops.apply_mod(x_mod, (1 + img_mod1.scale), img_mod1.shift, _modulation_dims(img_mod1, n_main, n_ref) if all_kv else dims_img)
    img_qkv = m.img_qkv(x_mod)
    del x_mod
    img_q, img_k, img_v = img_qkv.view(img_qkv.shape[0], img_qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    del img_qkv
    img_q, img_k = m.img_qk_norm(img_q, img_k, img_v)

    # text stream (always all tokens)
    txt_mod = m.txt_norm1(txt)
    txt_mod = ops.apply_mod(txt_mod, (1 + txt_mod1.scale), txt_mod1.shift, dims_txt)
    txt_qkv = m.txt_qkv(txt_mod)
    del txt_mod
    txt_q, txt_k, txt_v = txt_qkv.view(txt_qkv.shape[0], txt_qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    del txt_qkv
    txt_q, txt_k = m.txt_qk_norm(txt_q, txt_k, txt_v)

    q = torch.cat((txt_q, img_q), dim=2)
    k = torch.cat((txt_k, img_k), dim=2)
    v = torch.cat((txt_v, img_v), dim=2)
    del txt_q, img_q, txt_k, img_k, txt_v, img_v

    q, k, v = _attend_keys(cache, q, k, v, pe, seq_idx, ops, all_kv)
    if all_kv and not capture:
        q = seq_idx.gather(q, 2)
    q_mask = mask if capture else seq_idx.gather_queries(mask, n_txt + n_img)
    attn = ops.attention(q, k, v, block.num_heads, q_mask, opts)
    del q, k, v

    txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
    x += ops.apply_mod(m.img_proj(img_attn), img_mod1.gate, None, dims_img)
    del img_attn
    x += ops.apply_mod(m.img_mlp(ops.apply_mod(m.img_norm2(x), (1 + img_mod2.scale), img_mod2.shift, dims_img)), img_mod2.gate, None, dims_img)

    txt += ops.apply_mod(m.txt_proj(txt_attn), txt_mod1.gate, None, dims_txt)
    del txt_attn
    txt += ops.apply_mod(m.txt_mlp(ops.apply_mod(m.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift, dims_txt)), txt_mod2.gate, None, dims_txt)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)

    if not capture:
        x = img_idx.scatter_back(img, 1, x)
    return {"img": x, "txt": txt}


def _same_layout(buffer, value) -> bool:
    return buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype


def _attend_keys(cache, q, k, v, pe, seq_idx: IndexSet | None, ops: FluxOps, all_tokens: bool):
    """RoPE on the computed tokens' q and k, then the full keys and values of the block's cache.

    CAPTURE (and a block refreshing every token: all_tokens) stores the (roped) keys and values
    of every token; PRUNED scatters the computed tokens' fresh rows into the cache (seq_idx:
    the call's computed tokens, their rotary rows gathered once per call).
    Returns (q, k_full, v_full).
    """
    if pe is not None:
        q, k = ops.apply_rope(q, k, pe if all_tokens else seq_idx.gather_shared(pe, 2))
    if all_tokens:
        if _same_layout(cache.k, k) and _same_layout(cache.v, v):  # the first block of a pruned call: in place
            cache.k.copy_(k)
            cache.v.copy_(v)
        else:  # the capture call allocates the cache
            cache.k, cache.v = k, v.contiguous()
    else:
        if cache.k.shape[:2] != k.shape[:2] or cache.k.shape[3] != k.shape[3]:
            raise FluxPruningUnsupported(f"cached keys {tuple(cache.k.shape)} do not match {tuple(k.shape)}")
        seq_idx.scatter_back(cache.k, 2, k)
        seq_idx.scatter_back(cache.v, 2, v)
    return q, cache.k, cache.v


# ---------------------------------------------------------------------------------------------
# single blocks
# ---------------------------------------------------------------------------------------------
def make_single_block_hook(block, cache_index: int, ops: FluxOps, layer_host: LayerHost | None = None):
    """Replace patch for one single block; cache_index = number of double blocks + its index."""
    return _make_hook(block, cache_index, ops, _single_tokens, pruned_single_block, layer_host)


def _text_len(ctx, x: torch.Tensor, opts) -> int:
    """Text tokens of a single block's [text | image] sequence: the host's img_slice, else the
    call's text length read by its first (double) block."""
    sl = opts.get("img_slice")
    if sl is not None and sl[1] == x.shape[1]:
        return int(sl[0])
    if ctx.tokens is None:
        raise FluxPruningUnsupported("cannot tell text tokens from image tokens in a single block")
    return ctx.tokens.txt


def _single_tokens(ctx, args) -> CallTokens:
    """The call's token counts when its first hooked block is a single block."""
    x = args["img"]
    n_txt, n_main = _text_len(ctx, x, args["transformer_options"]), ctx.layout.num_tokens
    return CallTokens(txt=n_txt, img=n_main, ref=max(0, x.shape[1] - n_txt - n_main))


def pruned_single_block(block, cache_index: int, args: dict, ctx, ops: FluxOps, m: FluxBlockMath | None = None) -> dict:
    """One single block on text + selected image + reference tokens (SingleStreamBlock.forward order)."""
    x_full, vec, pe, mask, opts = args["img"], args["vec"], args["pe"], _hook_mask(args), args["transformer_options"]
    _check_patches(opts)
    _check_given_dims(args)
    m = m or FluxBlockMath(block, None)
    capture = ctx.mode is CallMode.CAPTURE
    cache = ctx.layout.blocks[cache_index]
    rows, n_all, _ = x_full.shape
    n_txt = _text_len(ctx, x_full, opts)
    n_img = n_all - n_txt
    n_main, n_ref = _n_main(ctx, n_img, opts)
    if not capture and cache.k is None:
        raise FluxPruningUnsupported(f"single block {cache_index} has no cache")

    mod = m.mod(vec)[0] if block.modulation else vec
    if capture:
        x, seq_idx, n_sel = x_full, None, n_main
    else:
        seq_idx = ctx.indices.computed(n_txt, n_main, n_ref)
        x = seq_idx.gather(x_full, 1)
        n_sel = ctx.index.shape[1]
    dims = _modulation_dims(mod, n_sel, n_ref, lead=n_txt)

    qkv, mlp = torch.split(m.linear1(ops.apply_mod(m.pre_norm(x), (1 + mod.scale), mod.shift, dims)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    del qkv
    q, k = m.qk_norm(q, k, v)

    q, k, v = _attend_keys(cache, q, k, v, pe, seq_idx, ops, capture)
    q_mask = mask if capture else seq_idx.gather_queries(mask, n_all)
    attn = ops.attention(q, k, v, block.num_heads, q_mask, opts)
    del q, k, v

    if block.yak_mlp:
        mlp = m.mlp_act(mlp[..., block.mlp_hidden_dim_first // 2:]) * mlp[..., :block.mlp_hidden_dim_first // 2]
    else:
        mlp = m.mlp_act(mlp)
    output = m.linear2(torch.cat((attn, mlp), 2))
    x += ops.apply_mod(output, mod.gate, None, dims)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)

    if not capture:
        x = seq_idx.scatter_back(x_full, 1, x)
    return {"img": x}
