"""Wiring CAT Pruning into ComfyUI's sampler loop (the only module that touches ModelPatcher).

- OUTER_SAMPLE: one fresh PruningRun per sampler run, stats published and caches freed after.
- SAMPLER_SAMPLE: wraps the step callback, so sampler steps (not model calls) are counted.
- PREDICT_NOISE: marks each sampler evaluation (cond + uncond), so the second evaluation of a
  two-call sampler step (heun, dpm_2, ...) is accounted to its own step.
- APPLY_MODEL: per model call, picks the layout's mode, merges fresh and cached outputs.
- dit replace patches on every transformer block, from the adapter that ADAPTERS picks for the
  model (SD3 / SD3.5 joint blocks; Flux and Chroma double and single blocks).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable


import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension as pe
from comfy.ldm.modules.diffusionmodules import mmdit as comfy_mmdit
from comfy.ldm.flux import layers as comfy_flux_layers
from comfy.ldm.flux import math as comfy_flux_math
from comfy.ldm.flux import model as comfy_flux
from comfy.ldm.chroma import model as comfy_chroma
from comfy.ldm.hunyuan_video import model as comfy_hunyuan_video
from comfy.ldm.qwen_image import model as comfy_qwen
from comfy.ldm.pixart import blocks as comfy_pixart_blocks
from comfy.ldm.pixart import pixartms as comfy_pixart

from ..cat_core import CATSettings, PruningRun
from ..cat_core.blocks import flux as flux_blocks
from ..cat_core.blocks.hooks import CALL_KEY
from ..cat_core.blocks import hunyuan as hunyuan_blocks
from ..cat_core.blocks import mmdit as mmdit_blocks
from ..cat_core.blocks import qwen as qwen_blocks
from ..cat_core.graph import GraphCall, module_tensors
from ..cat_core.blocks import pixart as pixart_blocks
from ..cat_core.model_call import model_call
from .layer_host import LAYER_HOST
from .samplers import sampler_support

HOLDER_KEY = "cat_pruning"
RUN_KEY = "cat_pruning_run"
WRAPPER_KEY = "cat_pruning"
log = logging.getLogger("CAT Pruning")

SUPPORTED = ("SD3-medium, SD3.5-large, SD3.5-medium (MMDiT / MMDiT-X), "
             "Flux.1 dev / schnell / Kontext, Flux.2 and Flux.2 Klein (ComfyUI's Flux class), Chroma, "
             "Qwen-Image / Qwen-Image-Edit, HunyuanImage 2.1, PixArt-α / PixArt-Σ")

try:  # pixel-space Chroma with a NeRF decoder head: a Chroma subclass that this pack does not prune
    from comfy.ldm.chroma_radiance.model import ChromaRadiance
    _NOT_PRUNED = (ChromaRadiance,)
except ImportError:  # pragma: no cover - older ComfyUI
    _NOT_PRUNED = ()


_PREDICTION_NAMES = {"CONST": "flow-matching", "EPS": "noise-prediction (eps)"}


class UnsupportedModelError(ValueError):
    """The model is not one this pack can prune; the message names it and lists what is supported."""


class CATHolder:
    """Per patched model: the settings and the stats of its last finished run."""

    def __init__(self, settings: CATSettings, info):
        self.settings = settings
        self.info = info
        self.last_stats = None


def apply_cat(model, settings: CATSettings):
    """Return a clone of `model` with CAT Pruning; the input model is left untouched."""
    diffusion_model = model.get_model_object("diffusion_model")
    name = type(model.model).__name__
    adapter = _adapter_for(diffusion_model)
    if adapter is None:
        raise UnsupportedModelError(f"CAT Pruning does not support {name} ({type(diffusion_model).__name__}); supported: {SUPPORTED}.")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, adapter.predictions):
        wanted = " or ".join(_PREDICTION_NAMES.get(c.__name__, c.__name__) for c in adapter.predictions)
        raise UnsupportedModelError(f"CAT Pruning needs a {wanted} model here; {name} samples with {type(sampling).__name__} "
                                    f"(a model sampling node before the patch?). Supported: {SUPPORTED}.")
    transformer_options = model.model_options.get("transformer_options", {})
    if HOLDER_KEY in transformer_options:
        raise ValueError("This model already has CAT Pruning applied; use one CAT Model Patch per model.")

    existing = transformer_options.get("patches_replace", {}).get("dit", {})
    if existing:
        # Another node's block patch cannot run on a subset of tokens: refuse rather than drop it.
        raise ValueError(f"this model already has block patches from another node on {sorted(existing)}; "
                         "apply CAT Model Patch before that node (CAT then runs those calls unpruned).")

    patched = model.clone()
    info, block_hooks, *rest = adapter.install(diffusion_model, adapter.host_ops, LAYER_HOST)
    for (kind, index), hook in block_hooks:
        patched.set_model_patch_replace(hook, "dit", kind, index)
    for name, obj in (rest[0] if rest else ()):  # blocks the host has no replace patch for
        patched.add_object_patch(name, obj)
    hooks = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for hook in hooks.values():
        hook.cat_pruning_hook = True
    holder = patched.model_options["transformer_options"][HOLDER_KEY] = CATHolder(settings, info)
    holder.hook_keys = tuple(hooks)
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    patched.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, _sampler_sample_wrapper)
    patched.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    return patched


def _adapter_for(diffusion_model) -> "Adapter | None":
    """The block adapter whose model classes this diffusion model is (ADAPTERS, in order)."""
    for adapter in ADAPTERS:
        if isinstance(diffusion_model, adapter.model_classes) and not isinstance(diffusion_model, adapter.excluded_classes):
            return adapter
    return None


def holder_of(model) -> CATHolder | None:
    return model.model_options.get("transformer_options", {}).get(HOLDER_KEY)


def _comfy_attention(q, k, v, heads, transformer_options):
    # The symbol mmdit bound at import, so overrides and the chosen backend are the model's own.
    return comfy_mmdit.optimized_attention(q, k, v, heads=heads, transformer_options=transformer_options)


def _flux_apply_rope(q, k, freqs):
    # Looked up at call time: the function flux.math's attention() uses.
    return comfy_flux_math.apply_rope(q, k, freqs)


def _flux_attention(q, k, v, heads, mask, transformer_options):
    # What flux.math.attention() runs after RoPE: the optimized_attention it bound at import.
    return comfy_flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options)


def _flux_apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    return comfy_flux_layers.apply_mod(tensor, m_mult, m_add, modulation_dims)


def _pixart_attention(q, k, v, heads, skip_reshape):
    # Looked up at call time: the optimized_attention PixArt's blocks bound at import, called as they call it.
    return comfy_pixart_blocks.optimized_attention(q, k, v, heads, mask=None, skip_reshape=skip_reshape)


FLUX_OPS = flux_blocks.FluxOps(apply_rope=_flux_apply_rope, attention=_flux_attention, apply_mod=_flux_apply_mod)


def _qwen_attention(q, k, v, heads, mask, transformer_options):
    # What qwen_image's Attention runs after RoPE: the optimized_attention_masked it bound at import.
    return comfy_qwen.optimized_attention_masked(q, k, v, heads, mask, transformer_options=transformer_options, skip_reshape=True)


def _qwen_apply_rope1(x, freqs):
    return comfy_qwen.apply_rope1(x, freqs)


_QWEN_BLOCK_INPUTS = ("block", "encoder_hidden_states_mask", "timestep_zero_index")


def _qwen_block_inputs(original_block):
    """The text mask and timestep_zero_index ComfyUI's Qwen-Image block loop gives its blocks but
    not the replace patch: read from the `original_block` closure it hands over (block_wrap in
    comfy/ldm/qwen_image/model.py), so they are exactly the block's own; None if not there."""
    code, cells = getattr(original_block, "__code__", None), getattr(original_block, "__closure__", None) or ()
    free = dict(zip(getattr(code, "co_freevars", ()), cells))
    try:
        return {name: free[name].cell_contents for name in _QWEN_BLOCK_INPUTS}
    except (KeyError, ValueError):  # another ComfyUI version: the adapter then runs the call unpruned
        return None


QWEN_OPS = qwen_blocks.QwenOps(apply_rope1=_qwen_apply_rope1, attention=_qwen_attention, block_inputs=_qwen_block_inputs)


def _install_hunyuan(diffusion_model, host_ops, layer_host):
    # One diffusion class serves HunyuanImage 2.1 and the video models: the adapter tells them apart.
    try:
        return hunyuan_blocks.install(diffusion_model, host_ops, layer_host)
    except hunyuan_blocks.NotPrunable as error:
        raise UnsupportedModelError(f"CAT Pruning: {error}. Supported: {SUPPORTED}.") from None


@dataclass(frozen=True)
class Adapter:
    """A block adapter of cat_core and the ComfyUI model classes it patches.

    install(diffusion_model, host_ops, layer_host) -> (ModelInfo, [(("double_block" | ..., i), hook)])
        or (ModelInfo, hooks, [(object path, replacement)]) for blocks reached by object patches
        (they read the call context from cat_core.model_call.ACTIVE_CALL);
    host_ops: the host's kernels the adapter calls (attention, RoPE, modulation);
    predictions: the model_sampling classes the adapter's output cache was checked with.
    """

    name: str
    model_classes: tuple
    install: Callable
    host_ops: object
    excluded_classes: tuple = ()
    predictions: tuple = (comfy.model_sampling.CONST,)


#: A new architecture: its adapter module in cat_core/blocks/ and one row here.
ADAPTERS = (
    Adapter("mmdit", (comfy_mmdit.MMDiT,), mmdit_blocks.install, _comfy_attention),
    Adapter("flux", (comfy_flux.Flux, comfy_chroma.Chroma), flux_blocks.install, FLUX_OPS, excluded_classes=_NOT_PRUNED),
    Adapter("qwen_image", (comfy_qwen.QwenImageTransformer2DModel,), qwen_blocks.install, QWEN_OPS),
    # HunyuanImage 2.1: ComfyUI's Flux blocks, so Flux's host ops (its blocks call flux.math.attention)
    Adapter("hunyuan_image", (comfy_hunyuan_video.HunyuanVideo,), _install_hunyuan, FLUX_OPS),
    Adapter("pixart", (comfy_pixart.PixArtMS,), pixart_blocks.install, _pixart_attention,
            predictions=(comfy.model_sampling.EPS,)),
)


def _outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    options = guider.model_options["transformer_options"]
    holder: CATHolder = options[HOLDER_KEY]
    run = options[RUN_KEY] = PruningRun(holder.settings, holder.info)
    try:
        return executor(*args, **kwargs)
    finally:
        stats = run.finish()
        holder.last_stats = stats
        guider.model_options = original_options
        saved = stats.ledger.saved_fraction()
        log.info("CAT Pruning: %d model calls, %.1f%% of MACs saved, %.2fs%s", len(stats.calls), 100 * saved,
                 stats.wall_seconds, f" (fell back to full compute: {stats.fallback_reason})" if stats.fallback_reason else "")


def _sampler_sample_wrapper(executor, *args, **kwargs):
    extra_args = args[2]
    run = extra_args.get("model_options", {}).get("transformer_options", {}).get(RUN_KEY)
    if run is None:
        return executor(*args, **kwargs)
    user_callback = args[3]
    run.use_sampler(*sampler_support(executor.class_obj))
    run.start_sampling(len(args[1]) - 1)  # args: (guider, sigmas, extra_args, callback, noise, ...)

    def step_callback(i, denoised, x, total_steps):
        run.on_step_end(i)
        if user_callback is not None:
            return user_callback(i, denoised, x, total_steps)

    args = (*args[:3], step_callback, *args[4:])
    return executor(*args, **kwargs)


def _predict_noise_wrapper(executor, *args, **kwargs):
    # (x, timestep, model_options, seed): one sampler evaluation, covering every cond chunk.
    model_options = args[2] if len(args) > 2 else kwargs.get("model_options", {})
    run = (model_options or {}).get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        run.begin_evaluation()
    return executor(*args, **kwargs)


def _blocks_not_ours(transformer_options) -> list:
    holder = transformer_options[HOLDER_KEY]
    dit = transformer_options.get("patches_replace", {}).get("dit", {})
    return [key for key in holder.hook_keys if not getattr(dit.get(key), "cat_pruning_hook", False)]


def _without_cat_hooks(transformer_options) -> dict:
    """This call's options without CAT's block patches (other nodes' patches stay)."""
    holder = transformer_options[HOLDER_KEY]
    replace = transformer_options.get("patches_replace", {})
    dit = {key: hook for key, hook in replace.get("dit", {}).items() if key not in holder.hook_keys}
    options = dict(transformer_options)
    options["patches_replace"] = {**replace, "dit": dit} if dit else {k: v for k, v in replace.items() if k != "dit"}
    return options


def _apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    run: PruningRun | None = transformer_options.get(RUN_KEY)
    if run is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    replaced = _blocks_not_ours(transformer_options)
    if replaced:
        # Another node (e.g. Skip Layer Guidance's extra pass) replaced our patch on some blocks for
        # this call: run it unpruned and keep it away from the caches of the regular calls.
        run.note_unpruned(f"model calls where another node replaced CAT's patch on {replaced} ran unpruned")
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def run_on(ctx, inputs):
        if ctx is not None:
            transformer_options[CALL_KEY] = ctx
        try:
            return executor(inputs["x"], inputs["t"], inputs["c_concat"], inputs["c_crossattn"], control, transformer_options,
                            **inputs["kwargs"])
        finally:
            transformer_options.pop(CALL_KEY, None)

    inputs = {"x": x, "t": t, "c_concat": c_concat, "c_crossattn": c_crossattn, "kwargs": kwargs}

    def run_model(ctx, hooks: bool):
        if not hooks:
            return executor(x, t, c_concat, c_crossattn, control, _without_cat_hooks(transformer_options), **kwargs)
        return run_on(ctx, inputs)

    chunks = transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or ()
    return model_call(run, x, t, chunks, getattr(c_crossattn, "shape", None), run_model,
                      passthrough=(comfy.model_management.InterruptProcessingException,),
                      graph=functools.partial(_graph_call, executor, inputs, run_on, control, transformer_options)
                      if run.settings.execution != "eager" else None)


def _graph_call(executor, inputs, run_on, control, transformer_options) -> GraphCall:
    """What graph replay of this call needs (cat_core/graph.py), and what rules it out."""
    holder = transformer_options[HOLDER_KEY]
    base_model = executor.class_obj
    diffusion_model = base_model.diffusion_model
    weights = getattr(holder, "graph_weights", None)
    if weights is None or weights[0] is not diffusion_model:
        weights = holder.graph_weights = (diffusion_model, module_tensors(diffusion_model))
    others = sorted(transformer_options.get("patches") or {})
    blocker = ("a ControlNet is applied" if control is not None
               else f"other nodes' model patches ({', '.join(others)}) run" if others
               # weights a graph would read at addresses that change: paged in and out per call
               else "weights are streamed by DynamicVRAM" if getattr(base_model, "dynamic_vbars", None)
               else "weights are partially loaded (low VRAM)" if getattr(base_model, "model_lowvram", False) else None)
    return GraphCall(inputs, run_on, weights[1], blocker, check=LAYER_HOST.check_interrupt)
