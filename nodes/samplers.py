"""Which of ComfyUI's samplers CAT keeps close to the unpatched image, and with which output cache.

Decided from tests/bench/quality.py on the trained SD3 fixture (24 images, the defaults): a
sampler is supported when its better output cache keeps every image close to the unpatched one
(the README's sampler table has the figures and the rule). A sampler that injects fresh noise at
every step, extrapolates from several past outputs, or updates with the unconditional
prediction (CFG++) turns a reused token's error into visible damage; those runs stay unpruned
unless the user sets prune_any_sampler. Samplers of other node packs are unmeasured, and
treated the same way.
"""
from __future__ import annotations

#: sampler -> what the output cache should hold: "velocity" (the model's prediction), or
#: "denoised" (its x0 prediction: unlike the velocity it does not carry the noise that a
#: sampler replaces between steps, nor does a refresh make a multistep history jump as far)
SUPPORTED: dict[str, str] = {
    # single-step solvers: a reused token's velocity stays consistent with how its x moved
    "euler": "velocity", "heun": "velocity", "heunpp2": "velocity", "exp_heun_2_x0": "velocity", "dpm_2": "velocity",
    "dpm_fast": "velocity",
    # two-step multistep and adaptive solvers: a cached x0 keeps their history from jumping at a refresh
    "dpmpp_2m": "denoised", "res_multistep": "denoised", "dpm_adaptive": "denoised", "seeds_3": "denoised",
}

NOISE = "injects fresh noise at every step, which CAT's caches cannot follow yet"
HIGHER_ORDER = "extrapolates from several past outputs, which turns a reused token's error into visible damage"
CFG_PP = "(CFG++) updates with the unconditional prediction, where CAT's reuse does visible damage"
#: samplers CAT cannot keep close yet -> the reason shown in CAT Stats
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
                     "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                     "dpmpp_3m_sde_gpu", "ddpm", "lcm", "exp_heun_2_x0_sde", "res_multistep_ancestral", "er_sde",
                     "seeds_2", "sa_solver", "sa_solver_pece"), NOISE),
    **dict.fromkeys(("lms", "ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "gradient_estimation"), HIGHER_ORDER),
    **dict.fromkeys(("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp",
                     "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"), CFG_PP),
}

#: samplers whose images step reuse keeps close where token pruning does not (unsupported, or its
#: worst image more than 2 dB under euler's): with reuse_threshold 0 (the default) their runs use
#: step reuse at this threshold instead, with a note; the user's own threshold or prune_any_sampler wins
SAMPLER_REUSE_THRESHOLD = 0.04
REUSE_INSTEAD = frozenset(("dpmpp_2m", "res_multistep", "seeds_3", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "er_sde", "uni_pc",
                           # the same samplers drawing their noise on the GPU
                           "dpmpp_2m_sde_gpu", "dpmpp_sde_gpu"))

UNMEASURED = "has not been measured with CAT Pruning"

#: ComfyUI's sampler functions whose name is not "sample_" + the sampler's name
_FUNCTION_NAMES = {"sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2", "dpm_fast_function": "dpm_fast",
                   "dpm_adaptive_function": "dpm_adaptive"}


def sampler_name(sampler) -> str:
    """ComfyUI's name of a KSAMPLER's sampler (ddim is euler), else the sampler's class name."""
    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", None)
    if name is None:
        return type(sampler).__name__
    return _FUNCTION_NAMES.get(name, name.removeprefix("sample_"))


def sampler_support(sampler) -> tuple[str, str | None, str | None, float | None]:
    """(name, output cache space for token pruning or None, why token pruning is unsupported or
    None, the step-reuse threshold to use instead or None) for PruningRun.use_sampler."""
    name = sampler_name(sampler)
    reuse = SAMPLER_REUSE_THRESHOLD if name in REUSE_INSTEAD else None
    if name in SUPPORTED:
        return name, SUPPORTED[name], None, reuse
    return name, None, UNSUPPORTED.get(name, UNMEASURED), reuse
