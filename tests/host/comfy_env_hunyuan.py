"""Tiny HunyuanVideo-class models (HunyuanImage 2.1, its refiner, HunyuanVideo) and their conds.

Seeded random state dicts in ComfyUI's own key layout, loaded through
``comfy.sd.load_diffusion_model_state_dict`` (ComfyUI's model detection picks the
supported_models entry: HunyuanImage21 for a 2-D patch without vector_in, HunyuanImage21Refiner
for patch [1, 1, 1], HunyuanVideo with vector_in).
"""
from __future__ import annotations

from typing import Any

import torch

from tests.host import comfy_env as ce

LATENT_CHANNELS = 64  # HunyuanImage 2.1's 32x VAE
CONTEXT_DIM = 64  # the LLM text features (Qwen2.5-VL: 3584)
BYT5_DIM = 1472  # ByT5Mapper's fixed input width

#: name -> HunyuanVideoParams overrides (the rest: hunyuan_kwargs' defaults)
LAYOUTS = {
    "image": {},  # HunyuanImage 2.1 base: patch [1, 1], byT5, no guidance embedder
    "image_distilled": {"guidance_embed": True, "meanflow": True},  # the distilled model: guidance + meanflow
    "refiner": {"patch_size": [1, 1, 1], "in_channels": 128, "guidance_embed": True, "meanflow": True, "byt5": False},
    "video": {"patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "byt5": False,
              "guidance_embed": True},
}


def hunyuan_kwargs(layout: str, hidden: int, depth: int, depth_single: int, context_dim: int = CONTEXT_DIM) -> dict:
    kw = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=None, context_in_dim=context_dim,
              hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=depth_single,
              theta=256, patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
              use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    kw.update(LAYOUTS[layout])
    kw["axes_dim"] = [64, 64] if len(kw["patch_size"]) == 2 else [16, 56, 56]
    return kw


def hunyuan_module(layout: str = "image", *, hidden: int = 256, depth: int = 2, depth_single: int = 2,
                   context_dim: int = CONTEXT_DIM, device="cpu"):
    c = ce._c()
    import comfy.ldm.hunyuan_video.model as hunyuan_model

    return hunyuan_model.HunyuanVideo(dtype=torch.float32, device=device, operations=c.ops.disable_weight_init,
                                      **hunyuan_kwargs(layout, hidden, depth, depth_single, context_dim))


#: The real HunyuanImage 2.1 transformer (Tencent's hunyuanimage_v2_1 configs): width 3584 =
#: 28 heads x 128, 20 double and 40 single blocks, Qwen2.5-VL-7B text features (3584).
HUNYUAN_IMAGE_21 = dict(hidden=3584, depth=20, depth_single=40, context_dim=3584)


def hunyuan_meta_state_dict(layout: str = "image") -> dict[str, torch.Tensor]:
    """The real model's state dict shapes as meta tensors (no memory), for ComfyUI's detection."""
    return hunyuan_module(layout, device="meta", **HUNYUAN_IMAGE_21).state_dict()


def tiny_hunyuan_state_dict(layout: str = "image", seed: int = 0, *, hidden: int = 256, depth: int = 2,
                            depth_single: int = 2) -> dict[str, torch.Tensor]:
    """A seeded random HunyuanVideo-class state dict (fp32, bare keys) that ComfyUI detects as ``layout``.

    head_dim 128 as in the real models (ComfyUI's detection reads heads = hidden // 128).
    """
    module = hunyuan_module(layout, hidden=hidden, depth=depth, depth_single=depth_single)
    return ce._seeded_like(module.state_dict(), seed)


def load_hunyuan(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32):
    """ComfyUI's UNETLoader path: detection, the supported_models entry, its model_base class."""
    c = ce._c()
    patcher = c.sd.load_diffusion_model_state_dict(dict(state_dict), model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError("ComfyUI did not detect a HunyuanVideo-class model")
    return patcher


def tiny_hunyuan(layout: str = "image", seed: int = 0, **kwargs):
    return load_hunyuan(tiny_hunyuan_state_dict(layout, seed, **kwargs))


def hunyuan_cond(seed: int, batch: int = 1, *, tokens: int = 8, pad: int = 0, byt5_tokens: int = 0,
                 guidance: float | None = None) -> list:
    """Seeded random HunyuanImage CONDITIONING: ``[[context [B, tokens, 64], extra]]``.

    pad: the last ``pad`` text tokens are padding (``attention_mask`` 0 there; ComfyUI passes the
    mask to the model only when some entry is 0). byt5_tokens: glyph features
    (``conditioning_byt5small``, a quoted text in the prompt). guidance: the distilled model's
    guidance value (ComfyUI's default 6.0 when None).
    """
    gen = torch.Generator().manual_seed(int(seed))
    context = torch.randn((batch, tokens, CONTEXT_DIM), generator=gen)
    extra: dict[str, Any] = {"pooled_output": None}
    if pad:
        mask = torch.ones((batch, tokens), dtype=torch.long)
        mask[:, tokens - pad:] = 0
        extra["attention_mask"] = mask
    if byt5_tokens:
        extra["conditioning_byt5small"] = torch.randn((batch, byt5_tokens, BYT5_DIM), generator=gen)
    if guidance is not None:
        extra["guidance"] = guidance
    return [[context, extra]]


# --------------------------------------------------------------------------
# Flux.2 Klein (ComfyUI's Flux class, detected as supported_models.Flux2)
# --------------------------------------------------------------------------
#: The real Klein transformers (Black Forest Labs' FLUX.2 [klein] 4B / 9B): width, heads (x 128),
#: double and single blocks, text features (three stacked Qwen3 layers: 3 x 2560 / 3 x 4096).
KLEIN_CONFIGS = {
    "klein_4b": dict(hidden=3072, heads=24, depth=5, depth_single=20, context_dim=3 * 2560),
    "klein_9b": dict(hidden=4096, heads=32, depth=8, depth_single=24, context_dim=3 * 4096),
}
KLEIN_LATENT_CHANNELS = 128
KLEIN_TXT_TOKENS = 512  # ComfyUI's Flux2 pads the text context to 512 tokens


def klein_module(*, hidden: int, depth: int, depth_single: int, context_dim: int, device="cpu"):
    """ComfyUI's Flux module in the Klein layout (Flux.2 blocks, no guidance embedder)."""
    c = ce._c()
    import comfy.ldm.flux.model as flux_model

    kwargs = ce._flux_kwargs("flux2", hidden, depth, depth_single, context_dim, 0, False)
    return flux_model.Flux(dtype=torch.float32, device=device, operations=c.ops.disable_weight_init, **kwargs)


def klein_meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The real Klein's state dict shapes as meta tensors (no memory), for ComfyUI's detection."""
    cfg = KLEIN_CONFIGS[name]
    return klein_module(hidden=cfg["hidden"], depth=cfg["depth"], depth_single=cfg["depth_single"],
                        context_dim=cfg["context_dim"], device="meta").state_dict()


def tiny_klein(seed: int = 0, *, hidden: int = 256, depth: int = 1, depth_single: int = 4, context_dim: int = 96):
    """A tiny Klein-layout model (few double, more single blocks, text of 3 stacked layers of 32)
    loaded through ComfyUI's detection (supported_models.Flux2 -> model_base.Flux2)."""
    sd = ce._seeded_like(klein_module(hidden=hidden, depth=depth, depth_single=depth_single,
                                      context_dim=context_dim).state_dict(), seed)
    return ce.load_flux(sd)
