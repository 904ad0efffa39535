"""Tests for the plain-torch reference MMDiT (host-free) and its parity with ComfyUI (host tier).

The host-tier tests only run when a ComfyUI checkout is found (tests/host/locate.py); comfy
is imported lazily (through the ``comfy`` fixture) so the rest of the suite never imports it.
"""


import pytest
import torch

from tests import reference_mmdit
from tests.host.locate import find_comfyui
from tests.reference_mmdit import ReferenceMMDiT, random_init_

LAYOUTS = {
    "sd3_medium": dict(depth=2, adm_in_channels=32, context_dim=48, pos_embed_max_size=16),
    "sd35_large": dict(depth=2, adm_in_channels=32, context_dim=48, pos_embed_max_size=16, qk_norm="rms"),
    "sd35_medium_mmditx": dict(depth=3, adm_in_channels=32, context_dim=48, pos_embed_max_size=16, qk_norm="rms",
                               x_block_self_attn_layers=[0, 1]),
}
SIZES = [(16, 16), (12, 20), (9, 13)]


def requires_comfy(test):
    """Host-tier marker: needs ComfyUI, imported lazily via the ``comfy`` fixture of tests/conftest.py."""
    found = find_comfyui()
    skip = pytest.mark.skipif(found.path is None, reason=f"host tier off: {found.how}")
    return pytest.mark.host(skip(test))


def make_model(layout, seed=0):
    return random_init_(ReferenceMMDiT(**LAYOUTS[layout]), seed).eval()


def make_inputs(model, hw, batch=2, n_ctx=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *hw, generator=gen)
    t = torch.tensor([999.0, 123.5][:batch])
    context = torch.randn(batch, n_ctx, model.config["context_dim"], generator=gen)
    y = torch.randn(batch, model.config["adm_in_channels"], generator=gen)
    return x, t, context, y


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("hw", SIZES)
def test_output_shape_and_finite(layout, hw):
    model = make_model(layout)
    x, t, context, y = make_inputs(model, hw)
    with torch.no_grad():
        out = model(x, t, context=context, y=y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_block_structure(layout):
    model = make_model(layout)
    cfg = LAYOUTS[layout]
    assert len(model.joint_blocks) == cfg["depth"]
    for i, block in enumerate(model.joint_blocks):
        last = i == cfg["depth"] - 1
        assert block.context_block.pre_only == last
        assert hasattr(block.context_block, "mlp") != last
        assert block.x_block.x_block_self_attn == (i in cfg.get("x_block_self_attn_layers", []))
        assert block.x_block.attn.num_heads == cfg["depth"]
    assert model.pos_embed.shape == (1, cfg["pos_embed_max_size"] ** 2, 64 * cfg["depth"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_passthrough_block_replace_is_bit_identical(layout):
    model = make_model(layout)
    x, t, context, y = make_inputs(model, (12, 20))
    calls = []

    def patch(args, extra):
        calls.append(sorted(args))
        assert args["txt"].shape[1] == context.shape[1]
        return extra["original_block"](args)

    replace = {("double_block", i): patch for i in range(len(model.joint_blocks))}
    with torch.no_grad():
        plain = model(x, t, context=context, y=y, transformer_options={})
        hooked = model(x, t, context=context, y=y, transformer_options={"patches_replace": {"dit": replace}})
    assert torch.equal(plain, hooked)
    assert calls == [["img", "transformer_options", "txt", "vec"]] * len(model.joint_blocks)


def test_block_replace_output_is_used():
    model = make_model("sd3_medium")
    x, t, context, y = make_inputs(model, (16, 16))

    def zero_img(args, extra):
        out = extra["original_block"](args)
        return {"txt": out["txt"], "img": torch.zeros_like(out["img"])}

    opts = {"patches_replace": {"dit": {("double_block", 1): zero_img}}}
    with torch.no_grad():
        assert not torch.allclose(model(x, t, context, y), model(x, t, context, y, transformer_options=opts))


def test_attention_is_swappable(monkeypatch):
    model = make_model("sd35_medium_mmditx")
    x, t, context, y = make_inputs(model, (9, 13))
    with torch.no_grad():
        expected = model(x, t, context=context, y=y)

    def naive_attention(q, k, v, heads):
        b, _, d = q.shape
        q, k, v = (a.reshape(b, -1, heads, d // heads).transpose(1, 2) for a in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, -1, d)

    monkeypatch.setattr(reference_mmdit, "attention", naive_attention)
    with torch.no_grad():
        got = model(x, t, context=context, y=y)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_from_state_dict_round_trip(layout, prefix):
    model = make_model(layout)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    clone = ReferenceMMDiT.from_state_dict(sd).eval()
    assert clone.config == model.config
    assert clone.state_dict().keys() == model.state_dict().keys()
    x, t, context, y = make_inputs(model, (12, 20))
    with torch.no_grad():
        assert torch.equal(model(x, t, context, y), clone(x, t, context, y))


def test_from_state_dict_casts_dtype():
    sd = {k: v.half() for k, v in make_model("sd35_large").state_dict().items()}
    model = ReferenceMMDiT.from_state_dict(sd, dtype=torch.bfloat16)
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}


def test_timestep_embedding_layout():
    emb = reference_mmdit.timestep_embedding(torch.tensor([0.0, 500.0]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128))
    assert torch.equal(emb[0, 128:], torch.zeros(128))


@requires_comfy
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_comfyui(comfy, layout):
    model = make_model(layout, seed=3)
    sd = model.state_dict()
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    assert isinstance(patcher.model, comfy.model_base.SD3)
    dm = patcher.model.diffusion_model.float()
    comfy_sd = dm.state_dict()
    assert comfy_sd.keys() == sd.keys()
    assert all(comfy_sd[k].shape == sd[k].shape for k in sd)

    device = next(dm.parameters()).device
    for hw in SIZES:
        x, t, context, y = make_inputs(model, hw, seed=5)
        with torch.no_grad():
            ours = model(x, t, context=context, y=y)
            theirs = dm(*(a.to(device) for a in (x, t)), context=context.to(device), y=y.to(device),
                        transformer_options={}).cpu()
        assert (ours - theirs).abs().max().item() <= 1e-4, (layout, hw)


@requires_comfy
def test_trained_fixture_samples_in_comfyui(comfy):
    """The committed tiny SD3 fixture loads as comfy SD3 and ComfyUI's sampler draws the prompted layout."""
    from safetensors.torch import load_file

    from tests.fixtures import sample_fixture, tiny_t2i

    patcher = comfy.sd.load_diffusion_model_state_dict(load_file(sample_fixture.WEIGHTS_PATH))
    assert isinstance(patcher.model, comfy.model_base.SD3)
    prompt = tiny_t2i.EVAL_PROMPTS[0]  # a big red circle on the left on a blue background
    context, pooled = tiny_t2i.encode_prompts([prompt, ""])
    positive = [[context[:1], {"pooled_output": pooled[:1]}]]
    negative = [[context[1:], {"pooled_output": pooled[1:]}]]
    noise = sample_fixture.initial_noise(1, 256, 256, seed=0)
    with torch.inference_mode():
        latent = comfy.sample.sample(patcher, noise, 8, 5.0, "euler", "simple", positive, negative,
                                     torch.zeros_like(noise), disable_pbar=True, seed=0).float().cpu()
    reference = sample_fixture.sample(sample_fixture.load_fixture_model(), [prompt], steps=8, cfg=5.0, noise=noise)
    assert (latent - reference).abs().max().item() < 0.05

    image = tiny_t2i.latent_to_rgb(latent)
    own = tiny_t2i.render_error(image, [prompt]).item()
    moved = tiny_t2i.render_error(image, [prompt.replace("left", "right")]).item()
    other = tiny_t2i.render_error(image, [tiny_t2i.EVAL_PROMPTS[1]]).item()
    assert own < 0.6 * moved and own < 0.5 * other, (own, moved, other)
