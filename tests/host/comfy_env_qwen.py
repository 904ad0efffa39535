"""Tiny Qwen-Image / Qwen-Image-Edit models and conditioning for host-tier tests.

ComfyUI's detection of a Qwen-Image state dict reads only the input channels, the depth and the
Edit-2511 / Layered markers; head size, head count, text width and RoPE axes are real
Qwen-Image's (3072 wide). A tiny model takes the detection's own steps by hand (detect the
config, set those four sizes to the tiny model's, build it, load the weights), as
comfy_env.load_flux does for Chroma, and ends in the same comfy.model_base.QwenImage.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from tests.host import comfy_env as ce

LATENT_CHANNELS = 16  # Wan 2.1 latent format, 5-D [B, 16, T, H, W]
TINY = dict(attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))


def tiny_qwen_state_dict(seed: int = 0, *, depth: int = 2, edit_2511: bool = False, **sizes) -> dict[str, torch.Tensor]:
    """A seeded random Qwen-Image state dict (fp32, bare keys) in the layout ComfyUI detects.

    edit_2511: with the `__index_timestep_zero__` marker (Qwen-Image-Edit-2511: reference tokens
    modulated at t = 0). Every tensor filled from one seeded generator in sorted-key order.
    """
    ce._c()
    import comfy.ldm.qwen_image.model as qwen_model

    config = {**TINY, **sizes}
    module = qwen_model.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=depth,
        default_ref_method="index_timestep_zero" if edit_2511 else "index",
        dtype=torch.float32, device="cpu", operations=ce._c().ops.disable_weight_init, **config)
    return ce._seeded_like(module.state_dict(), seed)


def load_qwen(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32):
    """Detect, build and load a tiny Qwen-Image model (a ModelPatcher of comfy.model_base.QwenImage)."""
    c = ce._c()
    import comfy.model_detection

    sd = dict(state_dict)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None or type(config).__name__ != "QwenImage":
        raise RuntimeError(f"ComfyUI did not detect a Qwen-Image model ({type(config).__name__})")
    head = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    inner = sd["img_in.weight"].shape[0]
    config.unet_config.update(attention_head_dim=head, num_attention_heads=inner // head,
                              joint_attention_dim=sd["txt_in.weight"].shape[1],
                              axes_dims_rope=TINY["axes_dims_rope"] if head == TINY["attention_head_dim"] else None)
    if config.unet_config["axes_dims_rope"] is None:
        raise ValueError(f"no RoPE axes for head size {head}")
    return ce.patcher_from_config(config, sd, dtype, c.model_base.QwenImage)


def tiny_qwen(seed: int = 0, **kwargs):
    """``load_qwen(tiny_qwen_state_dict(seed, **kwargs))``."""
    return load_qwen(tiny_qwen_state_dict(seed, **kwargs))


def reference_latent(hw: tuple[int, int], seed: int = 77) -> torch.Tensor:
    """A random one-frame reference latent [1, 16, 1, h, w] (what the Edit text encode node's VAE gives)."""
    return torch.randn(1, LATENT_CHANNELS, 1, *hw, generator=torch.Generator().manual_seed(seed))


def qwen_cond(seed: int, batch: int = 1, *, tokens: int = 8, context_dim: int = TINY["joint_attention_dim"],
              reference_latents: Sequence[torch.Tensor] | None = None, reference_latents_method: str | None = None,
              masked_tokens: int = 0, per_image: bool = True) -> list:
    """Seeded random Qwen-Image CONDITIONING ``[[context [B, tokens, dim], {...}]]``.

    masked_tokens: that many trailing text tokens masked out (an ``attention_mask`` [B, tokens],
    as the Qwen text encoder returns for padded prompts); reference_latents: Edit's
    ``reference_latents`` (ReferenceLatent / TextEncodeQwenImageEdit).
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows = batch if per_image else 1
    extra: dict[str, Any] = {}
    if masked_tokens:
        mask = torch.ones(rows, tokens, dtype=torch.long)
        mask[:, tokens - masked_tokens:] = 0
        extra["attention_mask"] = mask
    if reference_latents is not None:
        extra["reference_latents"] = list(reference_latents)
    if reference_latents_method is not None:
        extra["reference_latents_method"] = reference_latents_method
    return [[torch.randn((rows, tokens, context_dim), generator=gen), extra]]


def empty_latent(batch: int = 1, latent_hw: tuple[int, int] = (16, 16), frames: int = 1) -> torch.Tensor:
    return torch.zeros((batch, LATENT_CHANNELS, frames, *latent_hw), dtype=torch.float32)
