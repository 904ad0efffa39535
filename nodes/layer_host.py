"""ComfyUI's layers as plain functions for the pruned blocks' lean path (cat_core/blocks/layers.py).

ComfyUI's ops layers (comfy.ops) run, on every call: an interrupt check under a lock, then either
their cast path (`forward_comfy_cast_weights`: weights cast, offloaded or streamed per call, as
with DynamicVRAM, low-VRAM loads, manual-cast and fp8 storage, LoRA applied per call) or the
plain torch layer. The lean function is that same forward without the per-layer interrupt check
(the block checks once) and without module dispatch; it calls the layer's own cast method, so a
subclass's cast (fp8, scaled) is kept. Layers whose class replaces `forward` itself (quantized
ops, GGUF and other custom types), layers with hooks and layers whose forward was replaced on
the instance (LoRA in bypass mode) get None: the block calls the module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.ops
import comfy.rmsnorm
from comfy.ldm.modules.diffusionmodules import mmdit as comfy_mmdit

_OPS = comfy.ops.disable_weight_init


def _linear(m):
    return lambda x: F.linear(x, m.weight, m.bias)


def _layer_norm(m):
    return lambda x: F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _rms_norm(m):
    return lambda x: F.rms_norm(x, m.normalized_shape, m.weight, m.eps)


#: comfy.ops base class -> the torch layer's functional forward (what its plain branch runs)
_COMFY_OPS = ((_OPS.Linear, _linear), (_OPS.LayerNorm, _layer_norm), (_OPS.RMSNorm, _rms_norm))
#: plain torch layers
_TORCH = {torch.nn.Linear: _linear, torch.nn.LayerNorm: _layer_norm, torch.nn.RMSNorm: _rms_norm}


def _own_forward(module) -> bool:
    """No hooks, and no forward replaced on the instance (bypass LoRA restores its own bound forward)."""
    forward = vars(module).get("forward")
    if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
        return False
    return not (module._forward_hooks or module._forward_pre_hooks)


def _comfy_op(m, plain):
    """comfy.ops' forward (disable_weight_init), less the interrupt check: cast path or plain."""
    plain_forward = plain(m)
    cast_forward = m.forward_comfy_cast_weights

    def forward(x):
        if m.comfy_cast_weights or len(m.weight_function) > 0 or len(m.bias_function) > 0:
            return cast_forward(x)
        return plain_forward(x)
    return forward


class ComfyLayerHost:
    """The LayerHost of cat_core.blocks.layers for ComfyUI 0.16's layer types."""

    def functional(self, m):
        if not _own_forward(m):
            return None
        kind = type(m)
        for base, plain in _COMFY_OPS:
            if isinstance(m, base):
                return _comfy_op(m, plain) if kind.forward is base.forward else None
        if kind in _TORCH:
            return _TORCH[kind](m)
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
