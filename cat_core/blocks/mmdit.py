"""SD3 / SD3.5 (MMDiT, MMDiT-X) joint blocks under CAT pruning.

The hook follows the `patches_replace["dit"][("double_block", i)]` protocol that ComfyUI's
MMDiT (and tests/reference_mmdit.py) call: args {"img", "txt", "vec", "transformer_options"},
extra {"original_block"}; it returns {"txt", "img"} with "img" at full token length.
It calls the block's own submodules in the same order as the model does, so weights that the
host casts, offloads or patches (LoRA) behave exactly as in the unpatched model.
"""
from __future__ import annotations

import functools

import torch

from ..accounting import JointBlockLayout, MMDiTShape, joint_block_macs, mmdit_outer_macs
from ..runtime import CallMode, ModelInfo

CALL_KEY = "cat_pruning_call"


def describe(diffusion_model) -> ModelInfo:
    """Read the layout of an SD3-style MMDiT; raises TypeError for anything else."""
    blocks = getattr(diffusion_model, "joint_blocks", None)
    if blocks is None or not hasattr(diffusion_model, "x_embedder"):
        raise TypeError(f"{type(diffusion_model).__name__} is not an SD3-style MMDiT (no joint_blocks)")
    y = getattr(diffusion_model, "y_embedder", None)
    ctx = getattr(diffusion_model, "context_embedder", None)
    shape = MMDiTShape(
        dim=diffusion_model.hidden_size if hasattr(diffusion_model, "hidden_size") else blocks[0].x_block.attn.qkv.in_features,
        in_channels=diffusion_model.in_channels,
        out_channels=diffusion_model.out_channels,
        patch=diffusion_model.patch_size,
        adm_dim=y.mlp[0].in_features if y is not None else 0,
        context_dim=getattr(ctx, "in_features", 0) if ctx is not None else 0,
    )
    return ModelInfo(arch="mmdit", patch=diffusion_model.patch_size, num_blocks=len(blocks), outer_macs=functools.partial(mmdit_outer_macs, shape))


def make_block_hook(block, block_index: int, attention):
    """Build the replace-patch for one joint block.

    attention(q, k, v, heads, transformer_options) -> [B, Lq, D]: the host's attention function
    (ComfyUI's optimized_attention), so pruned and unpruned calls use the same kernel.
    """
    layout = JointBlockLayout(context_pre_only=bool(block.context_block.pre_only), image_self_attention=bool(block.x_block.x_block_self_attn))

    def hook(args, extra):
        ctx = args["transformer_options"].get(CALL_KEY)
        if ctx is None or ctx.mode is CallMode.DENSE:
            out = extra["original_block"](args)
            if ctx is not None:
                _count(ctx, layout, args["img"], args["txt"], None)
            return out
        return pruned_joint_block(block, layout, block_index, args, ctx, attention)

    hook.cat_block_index = block_index
    return hook


def pruned_joint_block(block, layout: JointBlockLayout, block_index: int, args: dict, ctx, attention) -> dict:
    """One joint block on the selected image tokens, attending over cached keys/values.

    CAPTURE computes every token and stores the keys/values; PRUNED gathers the selected rows
    of the image stream, scatters their fresh K/V into the cache, and writes their outputs back
    into the incoming full-length image tensor (unselected rows are stale, and ignored later
    because their model output is replaced by the cached output). With refresh_first_block the
    first block projects keys/values of every image token (its input is exact for all of them)
    and carries only the selected rows on from there.
    """
    txt, img, vec, opts = args["txt"], args["img"], args["vec"], args["transformer_options"]
    cache = ctx.layout.blocks[block_index]
    capture = ctx.mode is CallMode.CAPTURE
    all_kv = capture or (ctx.refresh_first_block and block_index == 0)
    x = img if all_kv else torch.gather(img, 1, ctx.gather_index(img))

    ctx_qkv, ctx_inter = block.context_block.pre_attention(txt, vec)
    x_block = block.x_block
    if layout.image_self_attention:
        x_qkv, x_qkv2, x_inter = x_block.pre_attention_x(x, vec)
    else:
        x_qkv, x_inter = x_block.pre_attention(x, vec)
        x_qkv2 = None
    n_txt = ctx_qkv[0].shape[1]
    ctx.txt_len = n_txt

    if capture:
        cache.k = torch.cat((ctx_qkv[1], x_qkv[1]), dim=1)
        cache.v = torch.cat((ctx_qkv[2], x_qkv[2]), dim=1)
    else:
        # Text rows are recomputed every call; image rows where selected (all with all_kv).
        cache.k[:, :n_txt].copy_(ctx_qkv[1])
        cache.v[:, :n_txt].copy_(ctx_qkv[2])
        _store_image_rows(ctx, cache.k, x_qkv[1], n_txt, all_kv)
        _store_image_rows(ctx, cache.v, x_qkv[2], n_txt, all_kv)
    if all_kv and not capture:
        # Keys/values of all tokens are in; from here on only the selected rows are carried.
        x_qkv = (_select(ctx, x_qkv[0]), *x_qkv[1:])
        x_inter = (_select(ctx, x_inter[0]), *x_inter[1:])
    q = torch.cat((ctx_qkv[0], x_qkv[0]), dim=1)
    attn = attention(q, cache.k, cache.v, x_block.attn.num_heads, opts)
    ctx_attn, x_attn = attn[:, :n_txt], attn[:, n_txt:]

    txt_out = None if block.context_block.pre_only else block.context_block.post_attention(ctx_attn, *ctx_inter)
    if x_qkv2 is not None:
        if capture:
            cache.k2, cache.v2 = x_qkv2[1].contiguous(), x_qkv2[2].contiguous()
        else:
            _store_image_rows(ctx, cache.k2, x_qkv2[1], 0, all_kv)
            _store_image_rows(ctx, cache.v2, x_qkv2[2], 0, all_kv)
            if all_kv:
                x_qkv2 = (_select(ctx, x_qkv2[0]), *x_qkv2[1:])
        attn2 = attention(x_qkv2[0], cache.k2, cache.v2, x_block.attn2.num_heads, opts)
        x_out = x_block.post_attention_x(x_attn, attn2, *x_inter)
    else:
        x_out = x_block.post_attention(x_attn, *x_inter)

    if not capture:
        img.scatter_(1, ctx.gather_index(img), x_out)
        x_out = img
    selected = None if capture else ctx.index.shape[1]
    _count(ctx, layout, img, txt, selected, img.shape[1] if all_kv else selected)
    return {"txt": txt_out, "img": x_out}


def _store_image_rows(ctx, cache: torch.Tensor, fresh: torch.Tensor, offset: int, all_rows: bool) -> None:
    """Write fresh image keys/values into the cache: every row, or the selected ones."""
    if all_rows:
        cache[:, offset:].copy_(fresh)
    else:
        cache.scatter_(1, ctx.gather_index(cache, offset), fresh)


def _select(ctx, rows: torch.Tensor) -> torch.Tensor:
    """The selected image rows of a full-length [B, L, ...] tensor."""
    return torch.gather(rows, 1, ctx.gather_index(rows))


def _count(ctx, layout: JointBlockLayout, img: torch.Tensor, txt: torch.Tensor, selected: int | None,
           projected: int | None = None) -> None:
    rows, n_img, dim = img.shape
    n_txt = txt.shape[1] if txt is not None else 0
    ctx.txt_len = n_txt
    dense = joint_block_macs(layout, rows, n_txt, n_img, n_img, dim)
    computed = dense if selected is None else joint_block_macs(layout, rows, n_txt, selected, n_img, dim, img_proj=projected)
    ctx.ledger.add("joint_blocks", computed, dense)
