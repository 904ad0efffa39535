"""Tests for the plain-torch reference Flux (host-free) and its parity with ComfyUI (host tier).

The host-tier tests only run when a ComfyUI checkout is found (tests/host/locate.py); comfy is
imported lazily (through the ``comfy`` fixture) so the rest of the suite never imports it.
"""

import pytest
import torch

from cat_core.blocks import flux as flux_blocks
from tests import reference_flux
from tests.reference_flux import ReferenceFlux, tiny_flux
from tests.test_reference_mmdit import requires_comfy

LAYOUTS = {
    "dev": dict(guidance_embed=True),
    "schnell": dict(guidance_embed=False),
}
SIZES = [(16, 16), (12, 20), (9, 13)]  # square, non-square, odd (padded to the patch size)
DOUBLE_ARGS = ["attn_mask", "img", "pe", "transformer_options", "txt", "vec"]
SINGLE_ARGS = ["attn_mask", "img", "pe", "transformer_options", "vec"]


def make_model(layout, seed=0):
    return tiny_flux(seed, **LAYOUTS[layout])


def make_inputs(model, hw, batch=2, n_ctx=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.params.in_channels, *hw, generator=gen)
    t = torch.tensor([0.9, 0.35][:batch])
    context = torch.randn(batch, n_ctx, model.params.context_in_dim, generator=gen)
    y = torch.randn(batch, model.params.vec_in_dim, generator=gen)
    guidance = torch.full((batch,), 3.5)
    return x, t, context, dict(y=y, guidance=guidance)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("hw", SIZES)
def test_output_shape_and_finite(layout, hw):
    model = make_model(layout)
    x, t, context, kw = make_inputs(model, hw)
    with torch.no_grad():
        out = model(x, t, context, **kw)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-2


def test_guidance_is_used_only_with_a_guidance_embedder():
    x, t, context, kw = make_inputs(make_model("dev"), (12, 20))
    other = dict(kw, guidance=torch.full((2,), 1.0))
    with torch.no_grad():
        dev, schnell = make_model("dev"), make_model("schnell")
        assert not torch.allclose(dev(x, t, context, **kw), dev(x, t, context, **other))
        assert torch.equal(schnell(x, t, context, **kw), schnell(x, t, context, **other))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_block_structure_is_what_the_adapter_reads(layout):
    model = make_model(layout)
    info = flux_blocks.describe(model)
    assert (info.arch, info.patch, info.num_blocks) == ("flux", 2, 4)
    double = flux_blocks.double_block_shape(model.double_blocks[0])
    single = flux_blocks.single_block_shape(model.single_blocks[0])
    h = model.hidden_size
    assert double.per_row == 2 * h * 6 * h and double.per_img_qkv == 3 * h * h
    assert single.per_img_token == h * (3 * h + 4 * h) + (h + 4 * h) * h
    for name, path in flux_blocks.FluxBlockMath.DOUBLE.items():
        assert isinstance(_get(model.double_blocks[0], path), torch.nn.Module), name
    for name, path in flux_blocks.FluxBlockMath.SINGLE.items():
        assert isinstance(_get(model.single_blocks[0], path), torch.nn.Module), name


def _get(obj, path):
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_passthrough_block_replace_is_bit_identical(layout):
    model = make_model(layout)
    x, t, context, kw = make_inputs(model, (12, 20))
    calls = []

    def patch(args, extra):
        opts = args["transformer_options"]
        calls.append((opts["block_type"], opts["block_index"], sorted(args), opts.get("img_slice")))
        return extra["original_block"](args)

    replace = {(kind, i): patch for kind in ("double_block", "single_block") for i in range(2)}
    with torch.no_grad():
        plain = model(x, t, context, **kw, transformer_options={})
        hooked = model(x, t, context, **kw, transformer_options={"patches_replace": {"dit": replace}})
    assert torch.equal(plain, hooked)
    n_all = context.shape[1] + 6 * 10
    assert calls == [("double", 0, DOUBLE_ARGS, None), ("double", 1, DOUBLE_ARGS, None),
                     ("single", 0, SINGLE_ARGS, [7, n_all]), ("single", 1, SINGLE_ARGS, [7, n_all])]


def test_block_replace_output_is_used():
    model = make_model("dev")
    x, t, context, kw = make_inputs(model, (16, 16))

    def zero_img(args, extra):
        out = extra["original_block"](args)
        return {"img": torch.zeros_like(out["img"])}

    with torch.no_grad():
        plain = model(x, t, context, **kw)
        for key in (("double_block", 1), ("single_block", 0)):
            opts = {"patches_replace": {"dit": {key: lambda a, e: {**e["original_block"](a), **zero_img(a, e)}}}}
            assert not torch.allclose(plain, model(x, t, context, **kw, transformer_options=opts)), key


def test_attention_is_swappable(monkeypatch):
    model = make_model("dev")
    x, t, context, kw = make_inputs(model, (9, 13))
    with torch.no_grad():
        expected = model(x, t, context, **kw)

    def naive_attention(q, k, v, heads, mask=None):
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    monkeypatch.setattr(reference_flux, "attention", naive_attention)
    with torch.no_grad():
        got = model(x, t, context, **kw)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got, expected)  # the swapped function really ran

    monkeypatch.setattr(reference_flux, "apply_rope", lambda q, k, pe: (q, k))
    with torch.no_grad():
        assert not torch.allclose(model(x, t, context, **kw), expected, atol=1e-3)  # RoPE is applied


def test_reference_latents_add_tokens_but_not_output():
    model = make_model("dev")
    x, t, context, kw = make_inputs(model, (12, 20))
    ref = torch.randn(2, 16, 10, 14, generator=torch.Generator().manual_seed(9))
    seen = []

    def patch(args, extra):
        seen.append((args["img"].shape[1], args["transformer_options"]["reference_image_num_tokens"]))
        return extra["original_block"](args)

    with torch.no_grad():
        plain = model(x, t, context, **kw)
        with_ref = model(x, t, context, **kw, ref_latents=[ref],
                         transformer_options={"patches_replace": {"dit": {("double_block", 0): patch}}})
    assert with_ref.shape == plain.shape and not torch.allclose(with_ref, plain)
    assert seen == [(6 * 10 + 5 * 7, [35])]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_from_state_dict_round_trip(layout, prefix):
    model = make_model(layout)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    clone = ReferenceFlux.from_state_dict(sd).eval()
    assert clone.config == model.config
    assert clone.state_dict().keys() == model.state_dict().keys()
    x, t, context, kw = make_inputs(model, (12, 20))
    with torch.no_grad():
        assert torch.equal(model(x, t, context, **kw), clone(x, t, context, **kw))


def test_from_state_dict_casts_dtype_and_refuses_other_families():
    sd = {k: v.half() for k, v in make_model("dev").state_dict().items()}
    model = ReferenceFlux.from_state_dict(sd, dtype=torch.bfloat16)
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}
    sd["double_stream_modulation_img.lin.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Flux.1"):
        ReferenceFlux.from_state_dict(sd)


def test_timestep_embedding_takes_sigma():
    emb = reference_flux.timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert torch.equal(emb[1, 0], torch.cos(torch.tensor(500.0)))


def comfy_flux(comfy, model):
    """ComfyUI's Flux loaded from the reference's state dict (fp32 CPU)."""
    sd = model.state_dict()
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    assert isinstance(patcher.model, comfy.model_base.Flux)
    dm = patcher.model.diffusion_model.float()
    assert type(dm).__module__ == "comfy.ldm.flux.model"
    comfy_sd = dm.state_dict()
    assert comfy_sd.keys() == sd.keys()
    assert all(comfy_sd[k].shape == sd[k].shape for k in sd)
    assert ReferenceFlux.config_from_state_dict(comfy_sd) == {k: v for k, v in model.config.items()
                                                              if k not in ("theta", "default_ref_method", "ref_index_scale")}
    return patcher, dm


def comfy_attention(q, k, v, heads, mask=None):
    """The attention ComfyUI's flux.math bound at import (sub-quadratic or PyTorch, by its device)."""
    import comfy.ldm.flux.math as flux_math

    return flux_math.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options={})


@requires_comfy
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_comfyui(comfy, layout, monkeypatch):
    """Same state dict, same inputs: ComfyUI's output; bit for bit with ComfyUI's attention kernel."""
    model = make_model(layout, seed=3)
    _, dm = comfy_flux(comfy, model)
    for hw in SIZES:
        for batch in (1, 2):
            x, t, context, kw = make_inputs(model, hw, batch=batch, seed=5)
            ref = [torch.randn(batch, 16, 6, 10, generator=torch.Generator().manual_seed(6))]
            with torch.no_grad():
                theirs = dm(x, t, context, **kw, transformer_options={})
                theirs_ref = dm(x, t, context, **kw, ref_latents=ref, transformer_options={})
                ours = model(x, t, context, **kw)
                with monkeypatch.context() as m:
                    m.setattr(reference_flux, "attention", comfy_attention)
                    exact = model(x, t, context, **kw)
                    exact_ref = model(x, t, context, **kw, ref_latents=ref)
            assert torch.equal(exact, theirs), (layout, hw, batch, (exact - theirs).abs().max().item())
            assert torch.equal(exact_ref, theirs_ref), (layout, hw, batch)
            assert (ours - theirs).abs().max().item() <= 1e-5, (layout, hw, batch)
