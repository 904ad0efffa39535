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


def setup():
    """Import ComfyUI (CPU mode when no GPU) and the pack; returns (comfy namespace, pack module)."""
    found = find_comfyui()
    if found.path is None:
        sys.exit(f"no ComfyUI found: {found.how}. Point COMFYUI_PATH at a ComfyUI checkout (see README, 'Benchmarks').")
    c = comfy_env.import_comfy(found.path)
    return c, comfy_env.import_pack()


def build_sd3(name: str, *, depth: int | None, dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher of ComfyUI's own SD3 model at the named shape with random weights."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    spec = dict(MODEL_SPECS[name])
    if depth is not None:
        spec["depth"] = depth
        spec["x_block_self_attn_layers"] = [i for i in spec["x_block_self_attn_layers"] if i < depth - 1]
    with torch.device("meta"):
        shapes = MMDiT(patch_size=2, in_channels=16, adm_in_channels=ADM_DIM, num_patches=spec["pos_embed_max_size"] ** 2,
                       context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 64 * spec["depth"]}},
                       operations=comfy.ops.disable_weight_init, **{k: v for k, v in spec.items() if k != "pos_embed_max_size"},
                       pos_embed_max_size=spec["pos_embed_max_size"]).state_dict()
    config = comfy.model_detection.model_config_from_unet(shapes, "")
    config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    model = config.get_model(shapes, "", device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for pname, p in list(model.diffusion_model.named_parameters()) + list(model.diffusion_model.named_buffers()):
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            value = torch.randn(p.shape, generator=gen) * (fan_in ** -0.5 if p.dim() > 1 else 0.02)
            if pname.endswith(("ln_q.weight", "ln_k.weight")):
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
