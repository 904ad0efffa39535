"""The lean block math of pruned calls (block_math "lean", the default) in real ComfyUI.

Lean and module calls are the same arithmetic in the same order, so at any keep ratio a lean run
must give bit for bit the latent of the same run with block_math "modules": with plain weights,
with weights cast per call (fp8 storage, low-VRAM partial loads: the layer's own cast path), with
LoRA merged into the weights, and where a layer must stay a module (LoRA injected in bypass mode,
module hooks). The run's stats say which blocks ran lean and which layers stayed modules.
"""
from __future__ import annotations

import pytest
import torch

from tests.host import comfy_env as ce

pytestmark = pytest.mark.host

STEPS, WARMUP = 6, 2


@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=41) for layout in ce.SD3_LAYOUTS}


def patched(pack, model, block_math, keep=0.3):
    settings = pack.cat_core.CATSettings(keep_ratio=keep, warmup_steps=WARMUP, cooldown_steps=0, block_math=block_math)
    return pack.nodes.patch.apply_cat(model, settings)


def run(model, batch=2):
    return ce.sample(model, seed=3, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
                     positive=ce.random_sd3_cond(1, batch), negative=ce.random_sd3_cond(2, batch),
                     batch=batch, latent_hw=(12, 16))


def lean_and_modules(pack, model, **kw):
    lean, modules = patched(pack, model, "lean", **kw), patched(pack, model, "modules", **kw)
    out_lean, out_modules = run(lean), run(modules)
    stats = pack.nodes.patch.holder_of(lean).last_stats
    assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
    assert pack.nodes.patch.holder_of(modules).last_stats.block_math["lean_blocks"] == 0
    return out_lean, out_modules, stats.block_math


@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_lean_blocks_give_the_module_result_bit_for_bit(pack, models, layout, keep):
    model = models[layout]
    out_lean, out_modules, math = lean_and_modules(pack, model, keep=keep)
    assert torch.equal(out_lean, out_modules)
    depth = len(model.get_model_object("diffusion_model").joint_blocks)
    assert math == {"setting": "lean", "lean_blocks": depth, "blocks": depth, "module_layers": {}}
    if keep == 1.0:
        assert torch.equal(out_lean, run(model))


def _lora(model):
    return ce.kohya_lora(model, ("joint_blocks_0_x_block_attn_qkv", "joint_blocks_1_x_block_mlp_fc1", "joint_blocks_0_context_block_adaLN_modulation_1"))


@pytest.mark.parametrize("mode", ["patch", "bypass"])
def test_lora_is_kept_on_pruned_steps(pack, models, mode):
    """A LoRA merged into the weights runs lean; one injected in bypass mode keeps its modules."""
    import comfy.sd

    base = models["sd3"]
    loader = comfy.sd.load_lora_for_models if mode == "patch" else comfy.sd.load_bypass_lora_for_models
    with_lora, _ = loader(base, None, _lora(base), 1.0, 0)
    out_lean, out_modules, math = lean_and_modules(pack, with_lora)
    assert torch.equal(out_lean, out_modules)
    assert (out_lean - lean_and_modules(pack, base)[0]).abs().max() > 1e-3, "the LoRA has no effect"
    if mode == "patch":
        assert math["module_layers"] == {}
    else:  # the three LoRA'd layers: bypass replaces their forward
        assert sum(math["module_layers"].values()) == 3, math


def test_fp8_weights_run_lean_through_their_cast_path(pack, comfy):
    model = ce.load_sd3(ce.tiny_sd3_state_dict("sd3", seed=41), dtype=torch.float8_e4m3fn)
    layer = model.get_model_object("diffusion_model").joint_blocks[0].x_block.attn.qkv
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.comfy_cast_weights, "setup: not an fp8 cast layer"
    out_lean, out_modules, math = lean_and_modules(pack, model)
    assert torch.equal(out_lean, out_modules)
    assert math["lean_blocks"] == math["blocks"] and math["module_layers"] == {}, math


def test_lowvram_partial_load_runs_lean_through_the_cast_path(pack, models, comfy, forced_lowvram):
    mm = comfy.model_management
    base = models["sd35_medium"]
    forced_lowvram["bytes"] = base.model_size() // 2

    def fresh_load_run(block_math):  # every run loads the weights anew under the budget
        mm.unload_all_models()
        model = patched(pack, base, block_math)
        out = run(model)
        assert base.model.model_lowvram, "ComfyUI did not load the model in lowvram mode"
        return out, pack.nodes.patch.holder_of(model).last_stats.block_math

    out_lean, math = fresh_load_run("lean")
    out_modules, _ = fresh_load_run("modules")
    assert torch.equal(out_lean, out_modules)
    assert math["lean_blocks"] == math["blocks"] and math["module_layers"] == {}, math


def test_a_hooked_layer_is_called_as_its_module(pack, models):
    model = models["sd3"]
    layer = model.get_model_object("diffusion_model").joint_blocks[1].x_block.mlp.fc2
    calls = []
    handle = layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        out_lean, out_modules, math = lean_and_modules(pack, model)
    finally:
        handle.remove()
    assert torch.equal(out_lean, out_modules)
    assert math["module_layers"] == {"Linear": 1}
    # both runs: every call of the block (dense, capture and pruned) went through the hook
    assert len(calls) == 2 * STEPS * 1


def test_cat_stats_report_names_the_block_math(pack, models):
    lean = patched(pack, models["sd3"], "lean")
    run(lean)
    report = pack.cat_core.report.format_report(pack.nodes.patch.holder_of(lean).last_stats)
    assert "Pruned blocks' math: lean in 2 of 2 blocks" in report


def test_interrupt_in_a_lean_block_stops_the_run(pack, models, comfy, monkeypatch):
    """The lean path checks for an interrupt once per block; it must reach ComfyUI, not the fallback."""
    mm = comfy.model_management
    lean = patched(pack, models["sd3"], "lean")
    host = pack.nodes.layer_host.LAYER_HOST
    seen = []

    def interrupt():
        seen.append(1)
        raise mm.InterruptProcessingException()

    monkeypatch.setattr(host, "check_interrupt", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        run(lean)
    assert seen == [1]


def test_layer_host_functions_compute_what_the_modules_compute(pack, comfy):
    import comfy.ops

    host = pack.nodes.layer_host.LAYER_HOST
    ops = comfy.ops.disable_weight_init
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen)

    def linear(cls=ops.Linear):
        m = cls(8, 4)
        with torch.no_grad():
            m.weight.copy_(torch.randn(4, 8, generator=gen))
            m.bias.copy_(torch.randn(4, generator=gen))
        return m

    cast = linear()
    cast.comfy_cast_weights = True
    patched_weights = linear()
    patched_weights.weight_function = [lambda w: w * 2]  # a LoRA applied per call
    lean = [linear(), cast, patched_weights, linear(comfy.ops.manual_cast.Linear),
            ops.LayerNorm(8, elementwise_affine=False, eps=1e-6), torch.nn.GELU(approximate="tanh")]
    for module in lean:
        fn = host.functional(module)
        assert fn is not None and torch.equal(fn(x), module(x)), module
    assert not torch.equal(host.functional(patched_weights)(x), linear()(x))

    replaced = linear()
    replaced.forward = lambda inp: inp  # bypass LoRA injects itself like this
    hooked = linear()
    hooked.register_forward_hook(lambda *a: None)
    own_forward = type("CustomLinear", (ops.Linear,), {"forward": lambda self, inp: inp})(8, 4)
    custom = type("GGUFLinear", (torch.nn.Module,), {"forward": lambda self, inp: inp})()
    for module in (replaced, hooked, own_forward, custom):
        assert host.functional(module) is None, module


@pytest.mark.parametrize("kind", ["flux", "flux2", "chroma"])
def test_flux_family_lean_blocks_give_the_module_result_bit_for_bit(pack, comfy, kind):
    """Double and single blocks (Flux.2: global modulation and SiLU-gated MLP; Chroma: modulations
    from its approximator) run lean, with the modules' result."""
    model = ce.tiny_flux(kind, seed=43)
    channels = 128 if kind == "flux2" else 16
    vec = 64 if kind == "flux" else None
    guidance = 0.0 if kind == "chroma" else 3.5
    pos, neg = (ce.flux_cond(seed, 1, tokens=7, vec_dim=vec, guidance=guidance) for seed in (1, 2))

    def flux_run(m):
        return ce.sample(m, seed=5, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple",
                         positive=pos, negative=neg, latent_image=torch.zeros(1, channels, 12, 16))

    lean, modules = patched(pack, model, "lean"), patched(pack, model, "modules")
    out_lean, out_modules = flux_run(lean), flux_run(modules)
    stats = pack.nodes.patch.holder_of(lean).last_stats
    assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
    assert torch.equal(out_lean, out_modules)
    dm = model.get_model_object("diffusion_model")
    blocks = len(dm.double_blocks) + len(dm.single_blocks)
    assert stats.block_math == {"setting": "lean", "lean_blocks": blocks, "blocks": blocks, "module_layers": {}}


def test_dense_calls_after_the_first_run_without_cat_hooks(pack, models, monkeypatch):
    """Warm-up and cool-down calls pay nothing for CAT: after one measured dense call per layout
    the model runs its own blocks, and the MACs charged are the measured call's."""
    hooks = pack.cat_core.blocks.hooks
    counted = []
    original = hooks.run_block
    monkeypatch.setattr(hooks, "run_block", lambda ctx, *a, **k: (counted.append(ctx and ctx.mode.value), original(ctx, *a, **k))[1])
    model = models["sd3"]
    depth = len(model.get_model_object("diffusion_model").joint_blocks)
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=3, cooldown_steps=2)
    patched_model = pack.nodes.patch.apply_cat(model, settings)
    run(patched_model)  # 6 steps: dense 0-1, capture 2, pruned 3, dense 4-5 (cool-down)
    stats = pack.nodes.patch.holder_of(patched_model).last_stats
    assert [c.mode for c in stats.calls] == ["dense", "dense", "capture", "pruned", "dense", "dense"]
    assert counted.count("dense") == depth, counted  # the first dense call only
    dense_macs = stats.ledger.total_dense
    # the same run with the hooks on every call charges the same MACs
    monkeypatch.setattr(pack.cat_core.runtime.PruningRun, "can_skip_hooks", lambda self, ctx: False)
    counted.clear()
    run(patched_model)
    again = pack.nodes.patch.holder_of(patched_model).last_stats
    assert counted.count("dense") == 4 * depth
    assert again.ledger.dense == stats.ledger.dense and again.ledger.computed == stats.ledger.computed
    assert dense_macs > 0
