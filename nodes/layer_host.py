"""ComfyUI's layers as plain functions for the pruned blocks' lean path (cat_core/blocks/layers.py).

Only where the functional form is exactly what the module's forward would run: ComfyUI's ops
layers whose weights are neither cast nor offloaded per call and carry no per-call weight patches
(LoRA in low-VRAM mode, for example), with no module hooks. Everything else (manual-cast, fp8,
scaled or quantized ops, GGUF and other custom layer types) gets None, and the block calls the module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.ops
import comfy.rmsnorm
from comfy.ldm.modules.diffusionmodules import mmdit as comfy_mmdit

_LINEAR = (comfy.ops.disable_weight_init.Linear, torch.nn.Linear)
_LAYER_NORM = (comfy.ops.disable_weight_init.LayerNorm, torch.nn.LayerNorm)
_RMS_NORM = (comfy.ops.disable_weight_init.RMSNorm, torch.nn.RMSNorm)


def _plain(module) -> bool:
    """The module's forward would call the torch function on its own weights, nothing else.

    Not plain: weights cast or offloaded per call, per-call weight patches, module hooks, and a
    forward replaced on the instance (LoRA in bypass mode injects itself that way).
    """
    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return False
    forward = vars(module).get("forward")  # bypass restores its layers with their own bound forward
    if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
        return False
    return not (module._forward_hooks or module._forward_pre_hooks)


class ComfyLayerHost:
    """The LayerHost of cat_core.blocks.layers for ComfyUI 0.16's layer types."""

    def functional(self, m):
        if not _plain(m):
            return None
        kind = type(m)
        if kind in _LINEAR:
            return lambda x: F.linear(x, m.weight, m.bias)
        if kind in _LAYER_NORM:
            return lambda x: F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        if kind in _RMS_NORM:
            return lambda x: F.rms_norm(x, m.normalized_shape, m.weight, m.eps)
        if kind is comfy_mmdit.RMSNorm:  # casts its weight to x's dtype and device, as the module does
            return lambda x: comfy.rmsnorm.rms_norm(x, m.weight, m.eps)
        if kind is torch.nn.Identity:
            return lambda x: x
        if kind is torch.nn.SiLU and not m.inplace:
            return F.silu
        if kind is torch.nn.GELU:
            approximate = m.approximate
            return lambda x: F.gelu(x, approximate=approximate)
        return None

    def check_interrupt(self) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()


LAYER_HOST = ComfyLayerHost()
