"""Tiny PixArt-α / PixArt-Σ models for host-tier tests, built through ComfyUI's detection.

ComfyUI 0.16.4's detection (model_detection.detect_unet_config) tells α from Σ by the
micro-conditioning keys but fixes the widths at the real models' (hidden 1152, 16 heads,
4096 caption channels, 4 latent channels, patch 2). ``load_pixart`` takes ComfyUI's steps by
hand (detect, then read the widths off the state dict, build, load), like comfy_env.load_flux
for Chroma, and ends in the same ``comfy.model_base.PixArt``; a state dict at the real widths
goes through ``comfy.sd.load_diffusion_model_state_dict`` unchanged.
"""
from __future__ import annotations

import json
from typing import Sequence

import torch

from tests.host import comfy_env as ce

PIXART_KINDS = ("alpha", "sigma")
LATENT_CHANNELS = 4
CAPTION = 64
TOKENS = 16


def tiny_pixart_state_dict(kind: str = "sigma", seed: int = 0, *, hidden: int = 192, heads: int = 3, depth: int = 2,
                           patch: int = 2, caption: int = CAPTION, tokens: int = TOKENS, qk_norm: bool = False,
                           kv_compress: dict | None = None) -> dict[str, torch.Tensor]:
    """A seeded random PixArtMS state dict (fp32, ComfyUI keys): "alpha" has the size / aspect
    micro-conditioning embedders, "sigma" not. Heads are not in the keys: pass them to load_pixart."""
    if kind not in PIXART_KINDS:
        raise ValueError(f"unknown PixArt kind {kind!r}; expected one of {PIXART_KINDS}")
    c = ce._c()
    from comfy.ldm.pixart.pixartms import PixArtMS

    model = PixArtMS(input_size=64, patch_size=patch, in_channels=LATENT_CHANNELS, hidden_size=hidden, depth=depth,
                     num_heads=heads, caption_channels=caption, model_max_length=tokens,
                     micro_condition=kind == "alpha", qk_norm=qk_norm, kv_compress_config=kv_compress,
                     dtype=torch.float32, device="cpu", operations=c.ops.disable_weight_init)
    sd = ce._seeded_like(model.state_dict(), seed)
    for name in sd:  # LayerNorm (qk_norm, KV-compression norm) weights near 1, as trained ones are
        if name.endswith("norm.weight"):
            sd[name] = 1.0 + 0.1 * sd[name]
    return sd


def load_pixart(state_dict: dict[str, torch.Tensor], *, heads: int | None = None, kv_compress: dict | None = None,
                dtype: torch.dtype = torch.float32):
    """A PixArt state dict in a ComfyUI ModelPatcher (comfy.model_base.PixArt).

    heads: attention heads (default hidden // 64); kv_compress: PixArt-Σ's kv_compress_config,
    which ComfyUI's detection never sets (so only a hand-built model has sr_ratio > 1).
    """
    c = ce._c()
    import comfy.model_detection

    sd = dict(state_dict)
    hidden = sd["t_block.1.weight"].shape[1]
    embed = sd["x_embedder.proj.weight"]
    detected_widths = (hidden == 1152 and heads in (None, 16) and tuple(embed.shape[1:]) == (4, 2, 2)
                       and sd["y_embedder.y_proj.fc1.weight"].shape[1] == 4096)
    if detected_widths and kv_compress is None:
        patcher = c.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
        if patcher is None or not isinstance(patcher.model, c.model_base.PixArt):
            raise RuntimeError("ComfyUI did not detect a PixArt model")
        return patcher
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None or config.unet_config.get("image_model") not in ("pixart_alpha", "pixart_sigma"):
        raise RuntimeError("ComfyUI did not detect a PixArt model")
    config.unet_config.update(
        hidden_size=hidden, num_heads=heads or hidden // 64, in_channels=embed.shape[1], patch_size=embed.shape[2],
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        qk_norm="blocks.0.attn.q_norm.weight" in sd)
    if kv_compress is not None:
        config.unet_config["kv_compress_config"] = kv_compress
    return ce.patcher_from_config(config, sd, dtype, c.model_base.PixArt)


def load_pixart_file(path) -> object:
    """A fixture file (fp16 weights, config in the metadata) loaded at fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    return load_pixart(sd, heads=config["num_heads"])


def tiny_pixart(kind: str = "sigma", seed: int = 0, **kwargs):
    """``load_pixart(tiny_pixart_state_dict(kind, seed, **kwargs))``."""
    heads = kwargs.get("heads", 3)
    return load_pixart(tiny_pixart_state_dict(kind, seed, **kwargs), heads=heads, kv_compress=kwargs.get("kv_compress"))


def pixart_cond(seed: int | str | Sequence[str], batch: int = 1, *, tokens: int = 8, caption: int = CAPTION) -> list:
    """PixArt CONDITIONING: seeded random text features [batch, tokens, caption], or the tiny
    fixture's encoding of prompts (a str or a list of them)."""
    if isinstance(seed, (str, list, tuple)):
        from tests.fixtures import tiny_pixart

        prompts = [seed] if isinstance(seed, str) else list(seed)
        return [[tiny_pixart.encode_prompts(prompts), {}]]
    gen = torch.Generator().manual_seed(int(seed))
    return [[torch.randn((batch, tokens, caption), generator=gen), {}]]


def empty_latent(batch: int = 1, latent_hw: tuple[int, int] = (16, 16)) -> torch.Tensor:
    return torch.zeros((batch, LATENT_CHANNELS, *latent_hw), dtype=torch.float32)
