"""A pruned call on the capture call's own input must reproduce the capture output (host tier).

Keep 1.0 exactness cannot catch bugs that only appear when the selected tokens are a strict
subset (wrong gather/scatter offsets, per-token modulation rows counted over all tokens, ...).
Here ComfyUI's real sampler runs two euler steps at the same sigma (dt = 0, so the second call
sees the first call's input bit for bit): step 0 captures, step 1 prunes at keep 0.3 / 0.55.
The caches then hold exact keys/values and outputs, so the recomputed tokens must come out as
in the capture call up to float rounding, and the reused ones are the capture output itself.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

SIGMA = 0.7
TXT = 8
RTOL = 1e-5  # of the output's scale: fp32 rounding of differently shaped matmuls / attention
RECORD_KEY = "cat_tests_outputs"

# adapter -> (model builder kind, latent channels, patch, Kontext reference latent size or None, ref method)
CASES = {
    "sd3": ("sd3", 16, 2, None, None),
    "sd35_large": ("sd35_large", 16, 2, None, None),
    "sd35_medium": ("sd35_medium", 16, 2, None, None),
    "flux": ("flux", 16, 2, None, None),
    "flux_kontext": ("flux", 16, 2, (10, 14), None),
    "flux2_ref": ("flux2", 128, 1, (5, 7), None),
    # Klein-like (no guidance embedder): ComfyUI 0.16.4's Flux.2 with a guidance embedder fails
    # index_timestep_zero at 2 rows by itself (timesteps doubled, guidance not), CAT or not.
    "flux2_ref_t0": ("flux2_klein", 128, 1, (5, 7), "index_timestep_zero"),
    "chroma": ("chroma", 16, 2, None, None),
}
SHAPES = {"square": (16, 16), "wide": (12, 20)}  # patch 2: 8x8 / 6x10 tokens
FLUX2_SHAPES = {"square": (8, 8), "wide": (6, 10)}  # patch 1
# model-call rows: (latent batch, cfg). "cfg_pair": uncond + cond chunks of one image in one call
# (pair_cfg: one shared selection); "two_images": two latents, each row its own selection.
BATCHES = {"one": (1, 1.0), "cfg_pair": (1, 4.0), "two_images": (2, 1.0)}


@pytest.fixture(scope="module")
def models(comfy):
    out = {layout: ce.tiny_sd3(layout, seed=31, depth=2) for layout in ce.SD3_LAYOUTS}
    out["flux"] = ce.tiny_flux("flux", seed=32)
    out["flux2"] = ce.tiny_flux("flux2", seed=33)
    out["flux2_klein"] = ce.tiny_flux("flux2", seed=35, guidance_embed=False)
    out["chroma"] = ce.tiny_flux("chroma", seed=34)
    return out


class Outputs:
    """Outermost APPLY_MODEL wrapper: what the sampler gets back from each model call."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, t, *args, **kwargs):
        out = executor(x, t, *args, **kwargs)
        self.calls.append((x.detach().clone(), out.detach().float().clone()))
        return out


def conds(case):
    kind, channels, _, ref_hw, method = CASES[case]
    if kind in ce.SD3_LAYOUTS:
        return ce.random_sd3_cond(1), ce.random_sd3_cond(2)
    refs = None
    if ref_hw is not None:
        refs = [torch.randn(1, channels, *ref_hw, generator=torch.Generator().manual_seed(77))]
    vec = 64 if kind == "flux" else None
    guidance = 0.0 if kind == "chroma" else 3.5
    return tuple(ce.flux_cond(seed, 1, tokens=TXT, vec_dim=vec, guidance=guidance, reference_latents=refs,
                              reference_latents_method=method) for seed in (1, 2))


def capture_then_prune(pack, comfy, model, case, *, keep, refresh, batch, latent_hw):
    """Two euler steps at one sigma through the patched model; returns (outputs, stats)."""
    channels = CASES[case][1]
    recorder = Outputs()
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RECORD_KEY, recorder)
    # CAT's APPLY_MODEL wrapper goes in after the recorder, i.e. inside it: the recorder sees
    # the merged output the sampler uses.
    settings = pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=1, cooldown_steps=0, refresh_first_block=refresh)
    patched = pack.nodes.patch.apply_cat(recorded, settings)
    pos, neg = conds(case)
    images, cfg = BATCHES[batch]
    latent = torch.zeros(images, channels, *latent_hw)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = torch.tensor([SIGMA, SIGMA, 0.0])
    with torch.inference_mode():
        comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, pos, neg, latent, disable_pbar=True, seed=5)
    return recorder.calls, pack.nodes.patch.holder_of(patched).last_stats


def shapes(case):
    return FLUX2_SHAPES if CASES[case][2] == 1 else SHAPES


MATRIX = list(itertools.product(CASES, [0.3, 0.55], [True, False], BATCHES, SHAPES))


@pytest.mark.parametrize("case,keep,refresh,batch,shape", MATRIX)
def test_pruned_call_on_the_capture_input_reproduces_the_capture_output(pack, comfy, models, case, keep, refresh, batch, shape):
    """Exact caches make the pruned arithmetic exact: any subset-only indexing bug shows here."""
    latent_hw = shapes(case)[shape]
    calls, stats = capture_then_prune(pack, comfy, models[CASES[case][0]], case, keep=keep, refresh=refresh,
                                      batch=batch, latent_hw=latent_hw)
    assert stats.fallback_reason is None, stats.fallback_reason
    assert [c.mode for c in stats.calls] == ["capture", "pruned"]
    pruned = stats.calls[-1]
    patch = CASES[case][2]
    rows = 2 if batch != "one" else 1
    tokens = (latent_hw[0] // patch) * (latent_hw[1] // patch)
    assert pruned.rows == rows and pruned.tokens_total == rows * tokens
    assert 0 < pruned.tokens_computed == rows * round(keep * tokens) < pruned.tokens_total

    (x0, capture), (x1, out) = calls
    assert x0.shape[0] == rows and torch.equal(x0, x1), "the pruned call must see the capture call's input"
    fresh = stats.selection_masks[0][0]  # [rows, h, w] tokens recomputed by the pruned call
    assert 0 < fresh.sum() < fresh.numel()
    scale = capture.abs().max().item()
    assert scale > 0
    mask = fresh.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None].expand_as(capture)
    diff = (out - capture).abs()
    recomputed, reused = diff[mask].max().item(), diff[~mask].max().item()
    assert recomputed <= RTOL * scale, f"recomputed tokens differ by {recomputed:.3g} (output scale {scale:.3g})"
    assert reused <= RTOL * scale, f"cached tokens differ by {reused:.3g} (output scale {scale:.3g})"
