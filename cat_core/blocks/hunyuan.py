"""HunyuanImage 2.1 under CAT pruning: ComfyUI's HunyuanVideo class with a 2-D patch.

ComfyUI builds HunyuanImage 2.1 from the Flux double / single blocks (comfy.ldm.flux.layers), so
the block math, caches, RoPE gathering and the lean path are flux.py's; this module holds what
differs: which HunyuanVideo-class models can be pruned, the token geometry and the cost model.

Token sequence: [ text | image ], text = [refined LLM tokens ‖ byT5 glyph tokens (when the
prompt quotes text)], image = the latent's row-major patch grid (HunyuanImage 2.1: patch 1 over a
64-channel latent at 1/32 of the image size). There are no reference tokens. The text padding
mask arrives as a [1, 1, L] bias over keys, so it holds unchanged for any subset of queries.

Not pruned (refused when patching): 3-D patches (HunyuanVideo, HunyuanVideo 1.5, the HunyuanImage
2.1 refiner; their latents are 5-D) and a non-square 2-D patch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..runtime import ModelInfo
from ..accounting import CallShape
from .flux import FluxCost, FluxOps, block_hooks, linear_macs
from .layers import LayerHost


class NotPrunable(ValueError):
    """A HunyuanVideo-class model this adapter does not prune; the message says why."""


@dataclass(frozen=True)
class HunyuanOuterShape:
    """Cost of one HunyuanImage call outside its blocks (all computed densely at every call).

    per_row: time / guidance / meanflow (time_r_in) / vector embedders and the final adaLN;
    per_img_token: img_in (the patch conv) and the final linear layer;
    text path (per call: the split of the text tokens is known from the blocks' text and the host's context):
    refiner_per_row (its t / c embedders and each refiner block's adaLN), refiner_per_token
    (input embedder, and each refiner block's qkv, proj and MLP), refiner_blocks x dim for the
    refiner's self-attention among LLM tokens, byt5_per_token (the glyph mapper).
    """

    per_row: int
    per_img_token: int
    refiner_per_row: int
    refiner_per_token: int
    refiner_blocks: int
    dim: int
    byt5_per_token: int


def outer_shape(diffusion_model) -> HunyuanOuterShape:
    dm = diffusion_model
    per_row = linear_macs(dm.time_in) + linear_macs(dm.vector_in) + linear_macs(dm.final_layer.adaLN_modulation)
    if dm.params.guidance_embed:  # HunyuanImage21's conds always carry a guidance value
        per_row += linear_macs(dm.guidance_in)
    # time_r_in (meanflow, the distilled model) runs when the call's sigma is one of the
    # schedule's: counted at every call (a sampler's off-schedule evaluations overcount it).
    per_row += linear_macs(dm.time_r_in)
    refiner = dm.txt_in
    blocks = refiner.individual_token_refiner.blocks
    refiner_per_row = linear_macs(refiner.t_embedder) + linear_macs(refiner.c_embedder)
    refiner_per_row += sum(linear_macs(b.adaLN_modulation) for b in blocks)
    refiner_per_token = linear_macs(refiner.input_embedder)
    refiner_per_token += sum(linear_macs(b.self_attn) + linear_macs(b.mlp) for b in blocks)
    return HunyuanOuterShape(per_row=per_row, per_img_token=linear_macs(dm.img_in) + linear_macs(dm.final_layer.linear),
                             refiner_per_row=refiner_per_row, refiner_per_token=refiner_per_token,
                             refiner_blocks=len(blocks), dim=dm.hidden_size, byt5_per_token=linear_macs(dm.byt5_in))


def hunyuan_outer_macs(shape: HunyuanOuterShape, rows: int, txt: int, img: int) -> int:
    """ModelInfo.outer_macs: embedders and final layer (the text path is counted per call)."""
    return rows * (shape.per_row + img * shape.per_img_token)


def text_path_macs(shape: HunyuanOuterShape, rows: int, n_llm: int, n_byt5: int) -> int:
    """The token refiner on n_llm LLM tokens and the byT5 mapper on n_byt5 glyph tokens."""
    per_row = shape.refiner_per_row + n_llm * shape.refiner_per_token
    per_row += shape.refiner_blocks * 2 * n_llm * n_llm * shape.dim
    return rows * (per_row + n_byt5 * shape.byt5_per_token)


def _text_call_macs(shape: HunyuanOuterShape):
    def count(call: CallShape) -> list:
        # The host's text context (c_crossattn) is the LLM part; the blocks' text adds byT5 tokens.
        context, n_txt = call.context, call.tokens.txt
        n_llm = min(n_txt, int(context[1])) if context is not None and len(context) == 3 else n_txt
        return [("text_in", text_path_macs(shape, call.rows, n_llm, n_txt - n_llm))]
    return count


def check_prunable(diffusion_model) -> int:
    """The square 2-D patch size of a HunyuanVideo-class model; NotPrunable otherwise."""
    dm = diffusion_model
    patch = list(getattr(dm, "patch_size", ()))
    if len(patch) != 2:
        raise NotPrunable(f"{type(dm).__name__} with patch size {patch} works on 3-D (video) latents "
                          "(HunyuanVideo, HunyuanVideo 1.5, the HunyuanImage 2.1 refiner); CAT Pruning prunes the "
                          "2-D HunyuanImage 2.1 model only")
    if patch[0] != patch[1]:
        raise NotPrunable(f"{type(dm).__name__} with a non-square patch {patch} is not supported")
    if getattr(dm, "vision_in", None) is not None:
        raise NotPrunable(f"{type(dm).__name__} with a vision encoder input (HunyuanVideo 1.5) is not supported")
    return int(patch[0])


def describe(diffusion_model) -> ModelInfo:
    dm = diffusion_model
    patch = check_prunable(dm)
    return ModelInfo(arch="hunyuan_image", patch=patch, num_blocks=len(dm.double_blocks) + len(dm.single_blocks),
                     outer_macs=functools.partial(hunyuan_outer_macs, outer_shape(dm)),
                     cost=FluxCost.of(dm, _text_call_macs(outer_shape(dm))))


def install(diffusion_model, ops: FluxOps, layer_host: LayerHost | None = None):
    """(ModelInfo, [(patch key, hook)]) for HunyuanImage 2.1; NotPrunable for the other variants."""
    info = describe(diffusion_model)
    return info, block_hooks(diffusion_model, ops, layer_host)
