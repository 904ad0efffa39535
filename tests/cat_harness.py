"""Host-free sampler around tests/reference_mmdit.py / reference_flux.py with CAT pruning, mirroring nodes/patch.py.

It reproduces what ComfyUI does around the model (flow sigmas with shift, CFG batching in a
chosen layout, Euler/Heun steps, a per-step callback) so the core can be tested without ComfyUI.
"""
from __future__ import annotations

import math

import torch

from cat_core import CATSettings, PruningRun
from cat_core.blocks import flux as flux_blocks
from cat_core.blocks import mmdit as mmdit_blocks
from cat_core.blocks.hooks import CALL_KEY
from cat_core.graph import GraphCall, module_tensors
from cat_core.model_call import model_call as cat_model_call
from tests import reference_flux, reference_mmdit


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """ComfyUI's "simple" schedule on ModelSamplingDiscreteFlow(shift), ending in 0."""
    ts = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * ts / (1 + (shift - 1) * ts)
    idx = [len(table) - 1 - int(i * len(table) / steps) for i in range(steps)]
    return torch.cat([table[idx], torch.zeros(1)])


def _attention(q, k, v, heads, transformer_options):
    return reference_mmdit.attention(q, k, v, heads)


# Flux's host ops (nodes/patch.py passes ComfyUI's): the reference's functions, looked up at call time.
def _flux_apply_rope(q, k, pe):
    return reference_flux.apply_rope(q, k, pe)


def _flux_attention(q, k, v, heads, mask, transformer_options):
    return reference_flux.attention(q, k, v, heads, mask)


def _flux_apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    return reference_flux.apply_mod(tensor, m_mult, m_add, modulation_dims)


FLUX_OPS = flux_blocks.FluxOps(apply_rope=_flux_apply_rope, attention=_flux_attention, apply_mod=_flux_apply_mod)


def patch_options(model, settings: CATSettings):
    """transformer_options with our block hooks, and a fresh run (one per sampling run)."""
    if isinstance(model, reference_flux.ReferenceFlux):
        info, hooks = flux_blocks.install(model, FLUX_OPS)
        return {"patches_replace": {"dit": dict(hooks)}}, PruningRun(settings, info)
    hooks = {("double_block", i): mmdit_blocks.make_block_hook(b, i, _attention) for i, b in enumerate(model.joint_blocks)}
    return {"patches_replace": {"dit": hooks}}, PruningRun(settings, mmdit_blocks.describe(model))


def sample(model, *, cond, uncond=None, noise, steps, cfg=5.0, settings: CATSettings | None = None,
           sampler="euler", layout="uncond_first", denoise=1.0, init_latent=None, sigmas=None, guidance=3.5):
    """Sample a batch; cond/uncond = (context [B, Lt, C], pooled [B, A]). Returns (latent, RunStats|None).

    layout: "uncond_first" (ComfyUI's usual [1, 0] batching), "cond_first", or "split" (two calls).
    sigmas: an explicit schedule (ending in 0) instead of flow_sigmas(steps); guidance: Flux's
    distilled guidance (ComfyUI's FluxGuidance value), ignored by MMDiT.
    """
    if sigmas is None:
        sigmas = flow_sigmas(steps)
    if denoise < 1.0:
        sigmas = flow_sigmas(int(steps / denoise))[-(steps + 1):]
    x = noise * sigmas[0] + (1 - sigmas[0]) * (init_latent if init_latent is not None else torch.zeros_like(noise))
    options, run = patch_options(model, settings) if settings is not None else ({}, None)
    use_cfg = uncond is not None and cfg != 1.0

    def model_call(x_in, sigma, ctx, pooled, keys):
        # every tensor the model reads, so a replayed pruned call can read static copies of them
        inputs = {"x": x_in, "context": ctx, "y": pooled, "sigma": torch.full((1, 1, 1, 1), float(sigma)),
                  **_timesteps(model, x_in.shape[0], float(sigma), guidance)}

        def forward(call, hooks, inputs):  # the harness's host: the reference model with our block hooks
            opts = dict(options) if hooks else {}
            if call is not None:
                opts[CALL_KEY] = call
            return inputs["x"] - inputs["sigma"] * _velocity(model, inputs, opts)

        def run_model(call, hooks):
            return forward(call, hooks, inputs)

        if run is None:
            return run_model(None, True)
        graph = GraphCall(inputs, lambda call, static: forward(call, True, static), module_tensors(model))
        # the protocol ComfyUI's wrapper uses: begin, run, merge, fall back on error
        return cat_model_call(run, x_in, torch.full((x_in.shape[0],), float(sigma)), keys, tuple(ctx.shape), run_model,
                              graph=graph)

    def denoise_fn(x_cur, sigma):
        b = x_cur.shape[0]
        if run is not None:
            run.begin_evaluation()
        if not use_cfg:
            return model_call(x_cur, sigma, cond[0], cond[1], ("cond",))
        if layout == "split":
            d_c = model_call(x_cur, sigma, cond[0], cond[1], ("cond",))
            d_u = model_call(x_cur, sigma, uncond[0], uncond[1], ("uncond",))
        else:
            first, second = (uncond, cond) if layout == "uncond_first" else (cond, uncond)
            keys = ("uncond", "cond") if layout == "uncond_first" else ("cond", "uncond")
            d = model_call(torch.cat([x_cur, x_cur]), sigma, torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]), keys)
            d_first, d_second = d[:b], d[b:]
            d_u, d_c = (d_first, d_second) if layout == "uncond_first" else (d_second, d_first)
        return d_u + cfg * (d_c - d_u)

    if run is not None:
        run.start_sampling(len(sigmas) - 1)
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            d = denoise_fn(x, s)
            slope = (x - d) / s
            if run is not None:
                run.on_step_end(i)
            if sampler == "heun" and s_next > 0:
                x2 = x + slope * (s_next - s)
                slope2 = (x2 - denoise_fn(x2, s_next)) / s_next
                x = x + (slope + slope2) / 2 * (s_next - s)
            else:
                x = x + slope * (s_next - s)
    return x, (run.finish() if run is not None else None)


def _timesteps(model, rows: int, sigma: float, guidance: float) -> dict:
    """The time inputs as ComfyUI's model_base gives them: SD3 sigma * 1000, Flux sigma and guidance."""
    if isinstance(model, reference_flux.ReferenceFlux):
        return {"t": torch.full((rows,), sigma), "guidance": torch.full((rows,), float(guidance))}
    return {"t": torch.full((rows,), sigma * 1000)}


def _velocity(model, inputs: dict, opts: dict) -> torch.Tensor:
    """The model's output on the call's inputs (see _timesteps)."""
    if isinstance(model, reference_flux.ReferenceFlux):
        return model(inputs["x"], inputs["t"], inputs["context"], y=inputs["y"], guidance=inputs["guidance"],
                     transformer_options=opts).float()
    return model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"], transformer_options=opts).float()


FLUX_LAYOUTS = {"flux": {}, "flux_schnell": {"guidance_embed": False}}


def tiny_model(layout="sd3", seed=0, depth=2, context_dim=64, adm=64):
    """A random reference MMDiT in one of the SD3-family layouts, or a reference Flux.1 ("flux", "flux_schnell")."""
    if layout in FLUX_LAYOUTS:
        return reference_flux.tiny_flux(seed, depth=depth, depth_single=depth, context_dim=context_dim, vec_dim=adm,
                                        **FLUX_LAYOUTS[layout])
    kwargs = {"sd3": {}, "sd35_large": {"qk_norm": "rms"}, "sd35_medium": {"qk_norm": "rms", "x_block_self_attn_layers": [0]}}[layout]
    model = reference_mmdit.ReferenceMMDiT(depth=depth, adm_in_channels=adm, context_dim=context_dim, pos_embed_max_size=32, **kwargs)
    return reference_mmdit.random_init_(model, seed).eval()


def random_cond(batch, seed, tokens=16, context_dim=64, adm=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, context_dim, generator=g), torch.randn(batch, adm, generator=g)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
