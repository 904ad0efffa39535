"""SD3 / SD3.5 (MMDiT, MMDiT-X) joint blocks under CAT pruning.

The hook follows the `patches_replace["dit"][("double_block", i)]` protocol that ComfyUI's
MMDiT (and tests/reference_mmdit.py) call: args {"img", "txt", "vec", "transformer_options"},
extra {"original_block"}; it returns {"txt", "img"} with "img" at full token length.
Its math is DismantledBlock's: either the block's own methods (block_math "modules"), or the
same arithmetic on layers resolved once per run (block_math "lean", see layers.py), where any
layer the host cannot turn into a plain function is still called as a module.
"""
from __future__ import annotations

import functools

import torch

from ..accounting import CallShape, CallTokens, JointBlockLayout, MMDiTShape, joint_block_macs, mmdit_outer_macs
from ..runtime import CallMode, ModelInfo
from .hooks import replace_hook
from .layers import LayerHost, LayerResolver


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
    costs = tuple((_block_layout(b), b.x_block.attn.qkv.in_features) for b in blocks)
    return ModelInfo(arch="mmdit", patch=diffusion_model.patch_size, num_blocks=len(blocks),
                     outer_macs=functools.partial(mmdit_outer_macs, shape), cost=functools.partial(call_cost, costs))


def _block_layout(block) -> JointBlockLayout:
    return JointBlockLayout(context_pre_only=bool(block.context_block.pre_only), image_self_attention=bool(block.x_block.x_block_self_attn))


def call_cost(blocks: tuple, shape: CallShape) -> list:
    """ModelInfo.cost: the joint blocks ((layout, width) each) of one call."""
    rows, txt = shape.rows, shape.tokens.txt
    computed = dense = 0
    for i, (layout, dim) in enumerate(blocks):
        q, kv, proj = shape.image_tokens(first=i == 0)
        dense += joint_block_macs(layout, rows, txt, kv, kv, dim)
        computed += joint_block_macs(layout, rows, txt, q, kv, dim, img_proj=proj)
    return [("joint_blocks", computed, dense)]


def call_tokens(ctx, args) -> CallTokens:
    """The call's token counts, from the first joint block's arguments."""
    txt = args["txt"]
    return CallTokens(txt=txt.shape[1] if txt is not None else 0, img=args["img"].shape[1])


def install(diffusion_model, attention, layer_host: LayerHost | None = None):
    """(ModelInfo, [(patch key, hook)]): one ("double_block", i) replace patch per joint block."""
    info = describe(diffusion_model)
    return info, [(("double_block", i), make_block_hook(block, i, attention, layer_host))
                  for i, block in enumerate(diffusion_model.joint_blocks)]


def make_block_hook(block, block_index: int, attention, layer_host: LayerHost | None = None):
    """Build the replace-patch for one joint block.

    attention(q, k, v, heads, transformer_options) -> [B, Lq, D]: the host's attention function
    (ComfyUI's optimized_attention), so pruned and unpruned calls use the same kernel.
    layer_host: turns the host's layers into plain functions for the lean path (None: modules).
    """
    layout = _block_layout(block)

    return replace_hook(
        block_index, layer_host,
        tokens=call_tokens,
        build_math=lambda host: JointBlockMath.of(block, host),
        pruned=lambda args, extra, ctx, math: pruned_joint_block(block, layout, block_index, args, ctx, attention, math))


def _modulate(x, shift, scale):
    # mmdit.modulate, on modulations already unsqueezed to [B, 1, D]
    return torch.addcmul(shift, x, 1 + scale)


class _LeanAttention:
    """SelfAttention.pre_attention / post_attention on resolved layers."""

    def __init__(self, attn, layer):
        self.head_dim = attn.head_dim
        self.qkv, self.ln_q, self.ln_k = layer(attn.qkv), layer(attn.ln_q), layer(attn.ln_k)
        self.proj = None if attn.pre_only else layer(attn.proj)

    def pre(self, x):
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1, self.head_dim).movedim(2, 0).unbind(0)
        q = self.ln_q(q).reshape(q.shape[0], q.shape[1], -1)
        k = self.ln_k(k).reshape(q.shape[0], q.shape[1], -1)
        return q, k, v


class LeanDismantledBlock:
    """DismantledBlock's pre/post attention methods, the same arithmetic in the same order."""

    lean = True

    def __init__(self, block, layer):
        self.pre_only = block.pre_only
        self.n_mods = 9 if block.x_block_self_attn else 2 if block.pre_only else 6
        self.silu, self.adaln = layer(block.adaLN_modulation[0]), layer(block.adaLN_modulation[1])
        self.norm1 = layer(block.norm1)
        self.attn = _LeanAttention(block.attn, layer)
        self.attn2 = _LeanAttention(block.attn2, layer) if block.x_block_self_attn else None
        if not block.pre_only:
            self.norm2 = layer(block.norm2)
            self.fc1, self.act, self.fc2 = layer(block.mlp.fc1), layer(block.mlp.act), layer(block.mlp.fc2)

    @staticmethod
    def supports(block) -> bool:
        """The layouts whose forward this class mirrors (SD3 / SD3.5); others keep the modules."""
        if block.training or block.scale_mod_only or len(block.adaLN_modulation) != 2:
            return False
        dropouts = [getattr(block.attn, "proj_drop", None), getattr(getattr(block, "attn2", None), "proj_drop", None)]
        if not block.pre_only:
            mlp = block.mlp
            if not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2", "drop1", "norm", "drop2")) or not isinstance(mlp.norm, torch.nn.Identity):
                return False  # SwiGLU or a normed MLP
            dropouts += [mlp.drop1, mlp.drop2]
        return all(d is None or d.p == 0 for d in dropouts)

    def _mlp(self, x, shift, scale):
        return self.fc2(self.act(self.fc1(_modulate(self.norm2(x), shift, scale))))

    def _modulations(self, c):
        # one unsqueeze for all of them: [B, 1, D] each, as mmdit unsqueezes each one at its use
        return self.adaln(self.silu(c)).unsqueeze(1).chunk(self.n_mods, dim=2)

    def pre_attention(self, x, c):
        m = self._modulations(c)
        qkv = self.attn.pre(_modulate(self.norm1(x), m[0], m[1]))
        return (qkv, None) if self.pre_only else (qkv, (x, m[2], m[3], m[4], m[5]))

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa * self.attn.proj(attn)
        return x + gate_mlp * self._mlp(x, shift_mlp, scale_mlp)

    def pre_attention_x(self, x, c):
        m = self._modulations(c)
        x_norm = self.norm1(x)
        qkv = self.attn.pre(_modulate(x_norm, m[0], m[1]))
        qkv2 = self.attn2.pre(_modulate(x_norm, m[6], m[7]))
        return qkv, qkv2, (x, m[2], m[3], m[4], m[5], m[8])

    def post_attention_x(self, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2):
        out1 = gate_msa * self.attn.proj(attn)
        out2 = gate_msa2 * self.attn2.proj(attn2)
        x = torch.stack([x, out1, out2], dim=0).sum(dim=0)  # mmdit.gate_cat
        return x + gate_mlp * self._mlp(x, shift_mlp, scale_mlp)


class JointBlockMath:
    """The two streams of a joint block, as the blocks' own modules or lean."""

    def __init__(self, context, x, lean: bool, module_layers=()):
        self.context, self.x, self.lean = context, x, lean
        self.module_layers = list(module_layers)  # lean: layers the host could not make functional

    @classmethod
    def of(cls, block, layer_host: LayerHost | None) -> "JointBlockMath":
        streams = (block.context_block, block.x_block)
        if layer_host is None or not all(LeanDismantledBlock.supports(b) for b in streams):
            return cls(*streams, lean=False)
        layer = LayerResolver(layer_host)
        return cls(*(LeanDismantledBlock(b, layer) for b in streams), lean=True, module_layers=layer.modules)


def pruned_joint_block(block, layout: JointBlockLayout, block_index: int, args: dict, ctx, attention,
                       math: JointBlockMath | None = None) -> dict:
    """One joint block on the selected image tokens, attending over cached keys/values.

    CAPTURE computes every token and stores the keys/values; PRUNED gathers the selected rows
    of the image stream, scatters their fresh K/V into the cache, and writes their outputs back
    into the incoming full-length image tensor (unselected rows are stale, and ignored later
    because their model output is replaced by the cached output). With refresh_first_block the
    first block projects keys/values of every image token (its input is exact for all of them)
    and carries only the selected rows on from there.
    """
    txt, img, vec, opts = args["txt"], args["img"], args["vec"], args["transformer_options"]
    math = math or JointBlockMath(block.context_block, block.x_block, lean=False)
    cache = ctx.layout.blocks[block_index]
    capture = ctx.mode is CallMode.CAPTURE
    all_kv = capture or (ctx.refresh_first_block and block_index == 0)
    selected = None if capture else ctx.indices.selection()
    x = img if all_kv else selected.gather(img, 1)

    ctx_qkv, ctx_inter = math.context.pre_attention(txt, vec)
    x_block = block.x_block
    if layout.image_self_attention:
        x_qkv, x_qkv2, x_inter = math.x.pre_attention_x(x, vec)
    else:
        x_qkv, x_inter = math.x.pre_attention(x, vec)
        x_qkv2 = None
    n_txt = ctx_qkv[0].shape[1]

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
        x_qkv = (selected.gather(x_qkv[0], 1), *x_qkv[1:])
        x_inter = (selected.gather(x_inter[0], 1), *x_inter[1:])
    q = torch.cat((ctx_qkv[0], x_qkv[0]), dim=1)
    attn = attention(q, cache.k, cache.v, x_block.attn.num_heads, opts)
    ctx_attn, x_attn = attn[:, :n_txt], attn[:, n_txt:]

    txt_out = None if block.context_block.pre_only else math.context.post_attention(ctx_attn, *ctx_inter)
    if x_qkv2 is not None:
        if capture:
            cache.k2, cache.v2 = x_qkv2[1].contiguous(), x_qkv2[2].contiguous()
        else:
            _store_image_rows(ctx, cache.k2, x_qkv2[1], 0, all_kv)
            _store_image_rows(ctx, cache.v2, x_qkv2[2], 0, all_kv)
            if all_kv:
                x_qkv2 = (selected.gather(x_qkv2[0], 1), *x_qkv2[1:])
        attn2 = attention(x_qkv2[0], cache.k2, cache.v2, x_block.attn2.num_heads, opts)
        x_out = math.x.post_attention_x(x_attn, attn2, *x_inter)
    else:
        x_out = math.x.post_attention(x_attn, *x_inter)

    if not capture:
        x_out = selected.scatter_back(img, 1, x_out)
    return {"txt": txt_out, "img": x_out}


def _store_image_rows(ctx, cache: torch.Tensor, fresh: torch.Tensor, offset: int, all_rows: bool) -> None:
    """Write fresh image keys/values into the cache: every row, or the selected ones."""
    if all_rows:
        cache[:, offset:].copy_(fresh)
    else:
        ctx.indices.selection(offset).scatter_back(cache, 1, fresh)

