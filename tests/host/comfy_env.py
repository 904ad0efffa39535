"""In-process ComfyUI helpers for host-tier tests.

Every ComfyUI import happens inside a function (after ``import_comfy``), so
importing this module is safe in the host-free tier.

Typical use (the ``comfy`` fixture in tests/conftest.py calls
``import_comfy`` for you)::

    sd = tiny_sd3_state_dict("sd35_medium", seed=0)
    model = load_sd3(sd)
    pos = random_sd3_cond(seed=1)
    neg = random_sd3_cond(seed=2)
    lat = sample(model, seed=3, steps=4, cfg=5.0, sampler_name="euler",
                 scheduler="simple", positive=pos, negative=neg)
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent

#: SD3-family layouts understood by ``tiny_sd3_state_dict``.
SD3_LAYOUTS = ("sd3", "sd35_large", "sd35_medium")

#: keys used for the wrappers installed by this module
SPLIT_CFG_KEY = "cat_tests_force_split_cfg"
RECORDER_KEY = "cat_tests_call_recorder"

LATENT_CHANNELS = 16  # SD3 latent format

_COMFY: types.SimpleNamespace | None = None


# --------------------------------------------------------------------------
# importing ComfyUI
# --------------------------------------------------------------------------
def _resolve_comfyui_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        from tests.host.locate import comfyui_path_or_raise

        path = comfyui_path_or_raise()
    p = Path(path).expanduser().resolve()
    if not (p / "comfy").is_dir():
        raise RuntimeError(f"{p} is not a ComfyUI checkout (no comfy/ package)")
    return p


def import_comfy(path: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """Import ComfyUI from ``path`` (default: ``tests/host/locate.py``'s find) in-process.

    Puts the checkout at ``sys.path[0]``; if CUDA is unavailable, sets
    ``comfy.cli_args.args.cpu = True`` before any other comfy module is
    imported (``comfy.model_management`` probes the device at import).
    Idempotent; returns a namespace of the imported modules.
    """
    global _COMFY
    root = _resolve_comfyui_path(path)
    if _COMFY is not None:
        if _COMFY.path != root:
            raise RuntimeError(f"ComfyUI already imported from {_COMFY.path}, not {root}")
        return _COMFY

    root_s = str(root)
    if root_s in sys.path:
        sys.path.remove(root_s)
    sys.path.insert(0, root_s)

    already = sys.modules.get("comfy")
    if already is not None:
        origin = Path(getattr(already, "__file__", "") or next(iter(getattr(already, "__path__", [""])), ""))
        if root not in origin.resolve().parents:
            raise RuntimeError(f"a different 'comfy' package is already imported: {origin}")

    import comfy.cli_args  # parses [] (not sys.argv) unless enable_args_parsing()

    args = comfy.cli_args.args
    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        args.cpu = True

    import comfy.model_management
    import comfy.model_base
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    version = "unknown"
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except Exception:  # pragma: no cover - very old checkouts
        pass

    _COMFY = types.SimpleNamespace(
        path=root,
        version=version,
        cli_args=comfy.cli_args,
        args=args,
        model_management=comfy.model_management,
        model_base=comfy.model_base,
        model_patcher=comfy.model_patcher,
        ops=comfy.ops,
        patcher_extension=comfy.patcher_extension,
        sample=comfy.sample,
        samplers=comfy.samplers,
        sd=comfy.sd,
        utils=comfy.utils,
        mmdit=mmdit,
    )
    return _COMFY


def _c() -> types.SimpleNamespace:
    return _COMFY if _COMFY is not None else import_comfy()


def import_pack(module_name: str = "ComfyUI_CAT_Pruning") -> types.ModuleType:
    """Import the repo root (the node pack) as a package, as ComfyUI does.

    ComfyUI loads a custom-node folder via ``spec_from_file_location`` on its
    ``__init__.py``; relative imports inside the pack then resolve against
    ``module_name``.  Needs ComfyUI importable (calls ``import_comfy``).
    """
    _c()
    if module_name in sys.modules:
        return sys.modules[module_name]
    init = REPO_ROOT / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist (the pack has no __init__.py yet)")
    spec = importlib.util.spec_from_file_location(
        module_name, init, submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


# --------------------------------------------------------------------------
# tiny random SD3 models
# --------------------------------------------------------------------------
def _layout_kwargs(layout: str, depth: int) -> dict:
    if layout == "sd3":
        return {}
    if layout == "sd35_large":
        return {"qk_norm": "rms"}
    if layout == "sd35_medium":
        return {"qk_norm": "rms", "x_block_self_attn_layers": [0]}
    raise ValueError(f"unknown SD3 layout {layout!r}; expected one of {SD3_LAYOUTS}")


def _fill_(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """Deterministic init at a scale that keeps activations O(1)."""
    if name == "pos_embed":
        t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    elif name.endswith(".bias"):
        t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    elif t.ndim == 1:  # RMSNorm (ln_q / ln_k) scales
        t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
    else:
        fan_in = max(1, math.prod(t.shape[1:]))
        t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(fan_in))


def _seeded_like(sd: dict, seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of sd's shapes, every one filled from one seeded generator in sorted key order."""
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in sorted(sd):
            t = torch.empty(sd[name].shape, dtype=torch.float32)
            _fill_(name, t, gen)
            out[name] = t.contiguous()
    return out


def tiny_sd3_state_dict(
    layout: str = "sd3",
    seed: int = 0,
    depth: int = 2,
    context_dim: int = 64,
    adm: int = 64,
    pos_embed_max_size: int = 32,
) -> dict[str, torch.Tensor]:
    """A seeded random SD3-family MMDiT state dict (fp32, bare keys).

    ``layout``: "sd3" (SD3-medium: no qk-norm), "sd35_large" (qk_norm rms:
    ``ln_q``/``ln_k`` weights) or "sd35_medium" (rms + MMDiT-X
    ``x_block_self_attn_layers=[0]``: ``joint_blocks.0.x_block.attn2.*``).
    hidden = 64*depth, heads = depth, patch 2, 16 latent channels; the
    latent may be up to 2*pos_embed_max_size on each side.  Every tensor is
    filled from ``torch.Generator().manual_seed(seed)`` in sorted-key order,
    so equal arguments give bit-identical weights.
    """
    c = _c()
    hidden = 64 * depth
    kwargs = _layout_kwargs(layout, depth)
    model = c.mmdit.MMDiT(
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        depth=depth,
        adm_in_channels=adm,
        context_embedder_config={
            "target": "torch.nn.Linear",
            "params": {"in_features": context_dim, "out_features": hidden},
        },
        num_patches=pos_embed_max_size * pos_embed_max_size,
        pos_embed_max_size=pos_embed_max_size,
        dtype=torch.float32,
        device="cpu",
        operations=c.ops.disable_weight_init,
        **kwargs,
    )
    sd = model.state_dict()
    return _seeded_like(sd, seed)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state_dict`` as .safetensors (for UNETLoader / the server)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def load_sd3(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32):
    """Load an SD3-family state dict into a ComfyUI ModelPatcher.

    Uses ``comfy.sd.load_diffusion_model_state_dict`` (the UNETLoader path)
    and asserts the detected model is ``comfy.model_base.SD3``.  ``dtype``
    forces the weight/inference dtype (fp32 default, for reproducibility);
    pass None to let ComfyUI choose.
    """
    c = _c()
    opts = {} if dtype is None else {"dtype": dtype}
    patcher = c.sd.load_diffusion_model_state_dict(dict(state_dict), model_options=opts)
    if patcher is None:
        raise RuntimeError("ComfyUI did not recognise the state dict")
    if not isinstance(patcher.model, c.model_base.SD3):
        raise TypeError(f"expected comfy.model_base.SD3, got {type(patcher.model).__name__}")
    return patcher


def tiny_sd3(layout: str = "sd3", seed: int = 0, **kwargs):
    """``load_sd3(tiny_sd3_state_dict(layout, seed, **kwargs))``."""
    return load_sd3(tiny_sd3_state_dict(layout, seed, **kwargs))


# --------------------------------------------------------------------------
# conditioning
# --------------------------------------------------------------------------
def _load_tiny_t2i():
    from tests.fixtures import tiny_t2i  # written by the fixtures owner

    return tiny_t2i


def sd3_cond(
    context: torch.Tensor | str | Sequence[str],
    pooled: torch.Tensor | None = None,
) -> list:
    """SD3 CONDITIONING ``[[context [B, L, D], {"pooled_output": pooled [B, adm]}]]``.

    ``context`` is either a tensor (then ``pooled`` is required; 2-D inputs
    get a batch dim) or a prompt / list of prompts, encoded with
    ``tests.fixtures.tiny_t2i.encode_prompts`` (one batch row per prompt).
    """
    if isinstance(context, str) or (
        isinstance(context, (list, tuple)) and context and isinstance(context[0], str)
    ):
        if pooled is not None:
            raise ValueError("pass either prompts or (context, pooled) tensors")
        prompts = [context] if isinstance(context, str) else list(context)
        context, pooled = _load_tiny_t2i().encode_prompts(prompts)
    if pooled is None:
        raise ValueError("pooled is required when context is a tensor")
    context = torch.as_tensor(context, dtype=torch.float32)
    pooled = torch.as_tensor(pooled, dtype=torch.float32)
    if context.ndim == 2:
        context = context.unsqueeze(0)
    if pooled.ndim == 1:
        pooled = pooled.unsqueeze(0)
    if context.shape[0] != pooled.shape[0]:
        raise ValueError(f"batch mismatch: context {tuple(context.shape)} vs pooled {tuple(pooled.shape)}")
    return [[context, {"pooled_output": pooled}]]


def random_sd3_cond(
    seed: int,
    batch: int = 1,
    *,
    tokens: int = 16,
    context_dim: int = 64,
    adm: int = 64,
    per_image: bool = True,
) -> list:
    """Seeded random SD3 conditioning with ``batch`` rows.

    ``per_image=True``: every image of the batch gets its own random
    context/pooled (rows differ); False: one random cond (batch 1), which
    ComfyUI repeats over the latent batch.
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows = batch if per_image else 1
    context = torch.randn((rows, tokens, context_dim), generator=gen)
    pooled = torch.randn((rows, adm), generator=gen)
    return sd3_cond(context, pooled)


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------
def _split_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: evaluate each non-empty cond list on its own.

    ``conds`` is ``[positive, negative(, ...)]`` with None for a cond that is
    not needed (cfg == 1).  Running ``_calc_cond_batch`` once per list means
    cond and uncond rows never share a model call.  Order mirrors
    ComfyUI's normal batching (uncond chunk before cond chunk).
    """
    active = [i for i, cond in enumerate(conds) if cond is not None]
    if len(active) <= 1:
        return executor(model, conds, x_in, timestep, model_options)
    out: list = [None] * len(conds)
    for i in reversed(active):
        only = [cond if j == i else None for j, cond in enumerate(conds)]
        out[i] = executor(model, only, x_in, timestep, model_options)[i]
    return [o if o is not None else torch.zeros_like(x_in) for o in out]


def split_cfg(model):
    """Clone of ``model`` whose sampler runs cond and uncond in separate calls.

    Adds a keyed CALC_COND_BATCH wrapper (``_split_cond_batch_wrapper``);
    composes with any other wrappers/patches on the model.
    """
    c = _c()
    m = model.clone()
    m.remove_wrappers_with_key(c.patcher_extension.WrappersMP.CALC_COND_BATCH, SPLIT_CFG_KEY)
    m.add_wrapper_with_key(c.patcher_extension.WrappersMP.CALC_COND_BATCH, SPLIT_CFG_KEY, _split_cond_batch_wrapper)
    return m


def empty_latent(batch: int = 1, latent_hw: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Zero SD3 latent ``[batch, 16, h, w]`` (what EmptySD3LatentImage gives for 8h x 8w)."""
    h, w = latent_hw
    return torch.zeros((batch, LATENT_CHANNELS, h, w), dtype=torch.float32)


def sample(
    model,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: list,
    negative: list,
    batch: int = 1,
    latent_hw: tuple[int, int] = (32, 32),
    denoise: float = 1.0,
    latent_image: torch.Tensor | None = None,
    force_split_cfg: bool = False,
    callback=None,
) -> torch.Tensor:
    """Run ComfyUI's KSampler path and return the sampled latent (CPU).

    Mirrors ``nodes.common_ksampler``: ``fix_empty_latent_channels``,
    ``comfy.sample.prepare_noise(latent, seed)``, then
    ``comfy.sample.sample(...)`` under ``torch.inference_mode()``.  The
    latent is ``latent_image`` or zeros ``[batch, 16, *latent_hw]``.
    Deterministic for equal arguments.  ``force_split_cfg`` evaluates cond
    and uncond in separate model calls (see ``split_cfg()``).
    """
    c = _c()
    if latent_image is None:
        latent_image = empty_latent(batch, latent_hw)
    latent_image = c.sample.fix_empty_latent_channels(model, latent_image)
    noise = c.sample.prepare_noise(latent_image, seed)
    if force_split_cfg:
        model = split_cfg(model)
    with torch.inference_mode():
        out = c.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent_image,
            denoise=denoise,
            callback=callback,
            disable_pbar=True,
            seed=seed,
        )
    return out.detach().to("cpu", torch.float32).clone()


# --------------------------------------------------------------------------
# model-call recorder
# --------------------------------------------------------------------------
class CallRecorder:
    """Records one entry per ``BaseModel.apply_model`` call (APPLY_MODEL wrapper).

    Each entry of ``calls`` is a dict with ``cond_or_uncond`` (list, 0 =
    positive, 1 = negative, one per batch chunk), ``uuids`` (list),
    ``sigmas`` (list of floats, one per latent row), ``sample_sigmas`` (list
    of floats or None) and ``x_shape`` (tuple).
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, executor, x, t, *args, **kwargs):
        # positional: (x, t, c_concat, c_crossattn, control, transformer_options)
        topts = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        sigmas = topts.get("sigmas")
        sample_sigmas = topts.get("sample_sigmas")
        self.calls.append(
            {
                "cond_or_uncond": list(topts.get("cond_or_uncond", [])),
                "uuids": list(topts.get("uuids", [])),
                "sigmas": [float(s) for s in sigmas.flatten()] if sigmas is not None else None,
                "sample_sigmas": [float(s) for s in sample_sigmas.flatten()] if sample_sigmas is not None else None,
                "x_shape": tuple(x.shape),
            }
        )
        return executor(x, t, *args, **kwargs)

    # convenience views -------------------------------------------------
    @property
    def layouts(self) -> list[list[int]]:
        """``cond_or_uncond`` of every call, in call order."""
        return [c["cond_or_uncond"] for c in self.calls]

    @property
    def first_sigmas(self) -> list[float]:
        """``sigmas[0]`` of every call (the per-call timestep)."""
        return [c["sigmas"][0] for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()


def record_calls(model, key: str = RECORDER_KEY):
    """Return ``(clone, recorder)``: a clone of ``model`` with an APPLY_MODEL
    wrapper that appends one entry to ``recorder.calls`` per model call."""
    c = _c()
    rec = CallRecorder()
    m = model.clone()
    m.add_wrapper_with_key(c.patcher_extension.WrappersMP.APPLY_MODEL, key, rec)
    return m, rec


__all__ = [
    "SD3_LAYOUTS",
    "CallRecorder",
    "empty_latent",
    "split_cfg",
    "import_comfy",
    "import_pack",
    "load_sd3",
    "random_sd3_cond",
    "record_calls",
    "sample",
    "save_state_dict",
    "sd3_cond",
    "tiny_sd3",
    "tiny_sd3_state_dict",
]


# --------------------------------------------------------------------------
# tiny random Flux-family models (Flux.1, Flux.2, Chroma)
# --------------------------------------------------------------------------
#: kinds understood by ``tiny_flux_state_dict``.
FLUX_KINDS = ("flux", "flux2", "chroma")

#: Chroma's modulation approximator: ComfyUI's detection hard-codes real Chroma's
#: (out_dim 3072 = hidden size, hidden_dim 5120); tiny models override these two.
_TINY_CHROMA_APPROX = {"hidden_dim": 64}


def _flux_kwargs(kind: str, hidden: int, depth: int, depth_single: int, context_dim: int, vec_dim: int,
                 guidance_embed: bool) -> dict:
    if kind == "flux":
        return dict(in_channels=16, out_channels=16, vec_in_dim=vec_dim, context_in_dim=context_dim,
                    hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth,
                    depth_single_blocks=depth_single, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                    qkv_bias=True, guidance_embed=guidance_embed, txt_ids_dims=[])
    if kind == "flux2":
        return dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=context_dim,
                    hidden_size=hidden, mlp_ratio=3.0, num_heads=hidden // 128, depth=depth,
                    depth_single_blocks=depth_single, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                    qkv_bias=False, guidance_embed=guidance_embed, txt_ids_dims=[3], global_modulation=True,
                    mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
    if kind == "chroma":
        return dict(in_channels=64, out_channels=64, context_in_dim=context_dim, hidden_size=hidden,
                    mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=depth_single,
                    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
                    out_dim=hidden, n_layers=5, txt_ids_dims=[], vec_in_dim=None,
                    **_TINY_CHROMA_APPROX)
    raise ValueError(f"unknown Flux kind {kind!r}; expected one of {FLUX_KINDS}")


def tiny_flux_state_dict(
    kind: str = "flux",
    seed: int = 0,
    *,
    hidden: int = 256,
    depth: int = 2,
    depth_single: int = 2,
    context_dim: int = 64,
    vec_dim: int = 64,
    guidance_embed: bool = True,
) -> dict[str, torch.Tensor]:
    """A seeded random Flux-family state dict (fp32, bare keys), in the layout ComfyUI detects.

    ``kind``: "flux" (Flux.1 dev layout: 16 latent channels, patch 2, guidance
    embedder unless ``guidance_embed=False`` = schnell), "flux2" (global
    modulation, SiLU-gated MLP, 128 latent channels, patch 1) or "chroma"
    (Flux blocks without per-block modulation, modulation approximator).
    head_dim is 128 as in the real models, so heads = hidden // 128.
    Every tensor is filled from ``torch.Generator().manual_seed(seed)`` in
    sorted-key order (ComfyUI's ops skip init), so equal arguments give
    bit-identical weights.
    """
    c = _c()
    kwargs = _flux_kwargs(kind, hidden, depth, depth_single, context_dim, vec_dim, guidance_embed)
    if kind == "chroma":
        import comfy.ldm.chroma.model as chroma_model

        module = chroma_model.Chroma(dtype=torch.float32, device="cpu", operations=c.ops.disable_weight_init, **kwargs)
    else:
        import comfy.ldm.flux.model as flux_model

        module = flux_model.Flux(dtype=torch.float32, device="cpu", operations=c.ops.disable_weight_init, **kwargs)
    sd = module.state_dict()
    return _seeded_like(sd, seed)


def load_flux(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32):
    """Load a Flux-family state dict into a ComfyUI ModelPatcher.

    Flux.1 / Flux.2 go through ``comfy.sd.load_diffusion_model_state_dict``
    (the UNETLoader path). Chroma's detection fixes the approximator at real
    Chroma's size, so a tiny Chroma takes the same steps by hand (detect the
    config, override the approximator's hidden_dim / out_dim, build the model,
    load the weights) and ends in the same ``comfy.model_base.Chroma``.
    """
    c = _c()
    import comfy.model_detection

    sd = dict(state_dict)
    if "distilled_guidance_layer.in_proj.weight" not in sd:
        patcher = c.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
        if patcher is None or not isinstance(patcher.model, c.model_base.Flux):
            raise RuntimeError("ComfyUI did not detect a Flux model")
        return patcher
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None:
        raise RuntimeError("ComfyUI did not detect a Chroma model")
    config.unet_config["out_dim"] = sd["distilled_guidance_layer.out_proj.weight"].shape[0]
    config.unet_config["hidden_dim"] = sd["distilled_guidance_layer.in_proj.weight"].shape[0]
    return patcher_from_config(config, sd, dtype, c.model_base.Chroma)


def patcher_from_config(config, sd: dict, dtype: torch.dtype, expected: type):
    """A ModelPatcher built from a detected model config that a tiny builder adjusted (ComfyUI's
    detection hard-codes some real-model widths), with the state dict's weights loaded."""
    c = _c()
    config.set_inference_dtype(dtype, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    if not isinstance(model, expected):
        raise TypeError(f"expected comfy.model_base.{expected.__name__}, got {type(model).__name__}")
    return c.model_patcher.ModelPatcher(model, load_device=c.model_management.get_torch_device(),
                                        offload_device=c.model_management.unet_offload_device())


def tiny_flux(kind: str = "flux", seed: int = 0, **kwargs):
    """``load_flux(tiny_flux_state_dict(kind, seed, **kwargs))``."""
    return load_flux(tiny_flux_state_dict(kind, seed, **kwargs))


def flux_cond(
    seed: int,
    batch: int = 1,
    *,
    tokens: int = 8,
    context_dim: int = 64,
    vec_dim: int | None = 64,
    guidance: float | None = 3.5,
    reference_latents: Sequence[torch.Tensor] | None = None,
    reference_latents_method: str | None = None,
    per_image: bool = True,
) -> list:
    """Seeded random Flux / Chroma CONDITIONING with ``batch`` rows.

    ``[[context [B, tokens, context_dim], {"pooled_output": [B, vec_dim] or None,
    "guidance": guidance, "reference_latents": [...]}]]``: the keys
    FluxGuidance (``guidance``) and ReferenceLatent (``reference_latents``,
    Kontext; latents in the model's latent space, before process_latent_in)
    set. ``vec_dim=None`` gives no pooled vector (Flux.2 / Chroma).
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows = batch if per_image else 1
    context = torch.randn((rows, tokens, context_dim), generator=gen)
    extra: dict[str, Any] = {"pooled_output": torch.randn((rows, vec_dim), generator=gen) if vec_dim else None}
    if guidance is not None:
        extra["guidance"] = guidance
    if reference_latents is not None:
        extra["reference_latents"] = list(reference_latents)
    if reference_latents_method is not None:
        extra["reference_latents_method"] = reference_latents_method
    return [[context, extra]]


def kohya_lora(model, layers: Sequence[str], seed: int = 8, rank: int = 4, scale: float = 0.3) -> dict:
    """A kohya-style LoRA state dict (lora_unet_<layer>.lora_down/up) for the named layers of `model`."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        shape = weights[key_map[f"lora_unet_{name}"]].shape
        out[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=gen) * scale
        out[f"lora_unet_{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=gen) * scale
    return out


class FlopsPerCall:
    """A model wrapper (DIFFUSION_MODEL or APPLY_MODEL): matmul MACs of every call (torch's FlopCounterMode / 2)."""

    def __init__(self):
        self.macs = []

    def __call__(self, executor, *args, **kwargs):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = executor(*args, **kwargs)
        self.macs.append(counter.get_total_flops() // 2)
        return out


def with_flops(model, comfy=None):
    counter = FlopsPerCall()
    m = model.clone()
    m.add_wrapper_with_key(_c().patcher_extension.WrappersMP.DIFFUSION_MODEL, "cat_tests_flops", counter)
    return m, counter
