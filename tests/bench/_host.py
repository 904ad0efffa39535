"""Shared setup of the benchmark scripts: import ComfyUI and the pack, build real-shaped models.

Benchmarks are scripts (run by hand, print JSON lines), not tests. They need ComfyUI:
COMFYUI_PATH=/path/to/ComfyUI python tests/bench/<script>.py ...
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.host import comfy_env  # noqa: E402
from tests.host.locate import find_comfyui  # noqa: E402

# Real SD3-family configurations (the unet_config ComfyUI detects from the checkpoints).
MODEL_SPECS = {
    "sd3-medium": dict(depth=24, qk_norm=None, x_block_self_attn_layers=[], pos_embed_max_size=192),
    "sd35-large": dict(depth=38, qk_norm="rms", x_block_self_attn_layers=[], pos_embed_max_size=192),
    "sd35-medium": dict(depth=24, qk_norm="rms", x_block_self_attn_layers=list(range(13)), pos_embed_max_size=384),
}
CONTEXT_DIM, ADM_DIM = 4096, 2048
FLUX_CONTEXT_DIM, FLUX_VEC_DIM = 4096, 768  # T5-XXL tokens, CLIP-L pooled


def setup(pytorch_attention: bool = False):
    """Import ComfyUI (CPU mode when no GPU) and the pack; returns (comfy namespace, pack module).

    `pytorch_attention`: ComfyUI's `--use-pytorch-cross-attention`, i.e. the attention it picks on
    CUDA by default; on a CPU it would otherwise pick sub-quadratic attention, whose number of
    chunks (and so of ops) grows with the token count.
    """
    found = find_comfyui()
    if found.path is None:
        sys.exit(f"no ComfyUI found: {found.how}. Point COMFYUI_PATH at a ComfyUI checkout (see README, 'Benchmarks').")
    if pytorch_attention:
        if "comfy.model_management" in sys.modules:
            raise RuntimeError("ComfyUI's attention is chosen at import: call setup(pytorch_attention=True) first")
        sys.path.insert(0, str(found.path))
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
    c = comfy_env.import_comfy(found.path)
    return c, comfy_env.import_pack()


def build_sd3(name: str, *, depth: int | None, dtype: torch.dtype, seed: int = 0, width: int | None = None):
    """A ModelPatcher of ComfyUI's own SD3 model at the named shape with random weights.

    `width` (a multiple of 64, ComfyUI's MMDiT head size) narrows the model while keeping its
    depth: MMDiT ties the hidden size to 64 * its `depth` argument, and its `num_blocks` argument
    (which ComfyUI's detection leaves at `depth`) sets the number of joint blocks.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    spec = dict(MODEL_SPECS[name])
    if depth is not None:
        spec["depth"] = depth
        spec["x_block_self_attn_layers"] = [i for i in spec["x_block_self_attn_layers"] if i < depth - 1]
    blocks = spec["depth"]
    if width is not None:
        if width % 64:
            raise ValueError(f"the SD3 width must be a multiple of 64 (the head size), got {width}")
        spec["depth"] = width // 64
    with torch.device("meta"):
        shapes = MMDiT(patch_size=2, in_channels=16, adm_in_channels=ADM_DIM, num_patches=spec["pos_embed_max_size"] ** 2,
                       context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 64 * spec["depth"]}},
                       operations=comfy.ops.disable_weight_init, num_blocks=blocks,
                       **{k: v for k, v in spec.items() if k != "pos_embed_max_size"},
                       pos_embed_max_size=spec["pos_embed_max_size"]).state_dict()
    config = comfy.model_detection.model_config_from_unet(shapes, "")
    config.unet_config["num_blocks"] = blocks  # detection infers blocks = hidden // 64
    return _random_patcher(config, shapes, dtype, seed)


def build_flux(*, double: int = 19, single: int = 38, width: int = 128, dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher of ComfyUI's own Flux.1-dev model (guidance embedder) with random weights.

    Real input sizes (T5 context 4096, CLIP pooled 768) and depth. At a `width` that is a multiple
    of 128 (Flux's head size) ComfyUI's detection gives the config as for a checkpoint; a narrower
    width (32, 64 or 96) is one head of that size, with the RoPE axes scaled to it, set on the
    detected config (detection derives heads = hidden // 128).
    """
    import comfy.model_detection
    import comfy.ldm.flux.model as flux_model

    if width % 128 and (width > 128 or width % 32):
        raise ValueError(f"the Flux width must be a multiple of 128 (the head size), or 32, 64 or 96 (one head), got {width}")
    head = min(width, 128)
    kwargs = comfy_env._flux_kwargs("flux", width, double, single, FLUX_CONTEXT_DIM, FLUX_VEC_DIM, guidance_embed=True)
    kwargs.update(num_heads=width // head, axes_dim=[head // 8, 7 * head // 16, 7 * head // 16])
    with torch.device("meta"):
        shapes = flux_model.Flux(operations=comfy.ops.disable_weight_init, **kwargs).state_dict()
    config = comfy.model_detection.model_config_from_unet(shapes, "")
    if head < 128:
        config.unet_config.update(num_heads=kwargs["num_heads"], axes_dim=kwargs["axes_dim"])
    return _random_patcher(config, shapes, dtype, seed)


def _random_patcher(config, shapes: dict, dtype: torch.dtype, seed: int):
    """Build the detected model on the torch device, fill it with scaled random weights, load it."""
    import comfy.model_management
    import comfy.model_patcher

    config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    model = config.get_model(shapes, "", device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for pname, p in list(model.diffusion_model.named_parameters()) + list(model.diffusion_model.named_buffers()):
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            value = torch.randn(p.shape, generator=gen) * (fan_in ** -0.5 if p.dim() > 1 else 0.02)
            if pname.endswith(("ln_q.weight", "ln_k.weight", "query_norm.weight", "key_norm.weight")):
                value = 1 + 0.1 * value
            p.copy_(value.to(p.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())
    comfy.model_management.load_models_gpu([patcher])
    return patcher


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
