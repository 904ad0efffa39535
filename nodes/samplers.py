"""Which of ComfyUI's samplers CAT keeps close to the unpatched image, and with which output cache.

From tests/bench/quality.py on the trained SD3 fixture (24 images, the defaults, keep 0.3); the
README's sampler table has the figures. A sampler that injects fresh noise at every step, or
extrapolates from several past outputs (higher-order multistep), turns the error of a reused
token into visible damage; those runs stay unpruned unless the user sets prune_any_sampler.
"""
from __future__ import annotations

#: sampler -> what the output cache should hold: "velocity" (the model's prediction), or
#: "denoised" (its x0 prediction: unlike the velocity it does not carry the noise that a
#: sampler replaces between steps, nor does a refresh make a multistep history jump as far)
SUPPORTED: dict[str, str] = {
    # single-step solvers: the reused tokens' velocity stays consistent with how x moved
    "euler": "velocity", "heun": "velocity", "heunpp2": "velocity", "exp_heun_2_x0": "velocity", "dpm_2": "velocity",
    # two-step multistep solvers: a cached x0 keeps their history from jumping at a refresh
    "dpmpp_2m": "denoised", "res_multistep": "denoised",
}

#: samplers CAT cannot keep close yet -> the reason shown in CAT Stats
UNSUPPORTED: dict[str, str] = {
    # single-step solvers: the reused tokens' velocity stays consistent with how x moved
    "euler": "velocity", "heun": "velocity", "heunpp2": "velocity", "exp_heun_2_x0": "velocity", "dpm_2": "velocity",
    # two-step multistep solvers: a cached x0 keeps their history from jumping at a refresh
    "dpmpp_2m": "denoised", "res_multistep": "denoised",
}

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


def sampler_support(sampler) -> tuple[str, str | None, str | None]:
    """(name, output cache space or None, why it is unsupported or None) for PruningRun.use_sampler."""
    name = sampler_name(sampler)
    if name in SUPPORTED:
        return name, SUPPORTED[name], None
    return name, None, UNSUPPORTED.get(name, UNMEASURED)
