"""Host-tier smoke tests: prove the ComfyUI test infrastructure itself works.

* tiny random SD3 / SD3.5-large / SD3.5-medium (MMDiT-X) models load through
  ComfyUI's UNET loader path and sample with ``comfy.sample.sample``;
* the call recorder sees ComfyUI's cond/uncond batch layouts, and
  ``force_split_cfg`` really runs cond and uncond in separate calls;
* a headless server loads the CATFixture nodes and runs a graph through
  POST /prompt, matching the in-process ``sample`` helper.

Skipped (reason in tests/conftest.py) unless a ComfyUI checkout is found.
"""
from __future__ import annotations


import pytest
import torch

from tests.host.locate import skip_for_missing
from tests.host import comfy_env as ce
from tests.host.server import ComfyServerError, default_custom_nodes

pytestmark = pytest.mark.host

STEPS = 3


@pytest.fixture(scope="module")
def models(comfy):
    """One loaded ModelPatcher per layout (seeded)."""
    return {layout: ce.load_sd3(ce.tiny_sd3_state_dict(layout, seed=7)) for layout in ce.SD3_LAYOUTS}


@pytest.fixture(scope="module")
def conds(comfy):
    return {"pos": ce.random_sd3_cond(1), "neg": ce.random_sd3_cond(2)}


# --------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
def test_tiny_state_dict_layout_and_detection(comfy, layout):
    sd = ce.tiny_sd3_state_dict(layout, seed=0)
    keys = set(sd)
    has_rms = "joint_blocks.0.context_block.attn.ln_q.weight" in keys
    attn2 = sorted(k for k in keys if ".x_block.attn2." in k)
    assert has_rms == (layout != "sd3")
    if layout == "sd35_medium":
        assert attn2 and all(k.startswith("joint_blocks.0.") for k in attn2)
    else:
        assert not attn2
    assert sd["pos_embed"].shape == (1, 32 * 32, 128)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in sd.values())

    again = ce.tiny_sd3_state_dict(layout, seed=0)
    other = ce.tiny_sd3_state_dict(layout, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["joint_blocks.0.x_block.attn.qkv.weight"], other["joint_blocks.0.x_block.attn.qkv.weight"])

    model = ce.load_sd3(sd)
    assert isinstance(model.model, comfy.model_base.SD3)
    dm = model.model.diffusion_model
    assert dm.depth == 2 and dm.hidden_size == 128 and len(dm.joint_blocks) == 2
    assert list(dm.x_block_self_attn_layers) == ([0] if layout == "sd35_medium" else [])
    # every weight was loaded (ComfyUI's loader only warns on missing keys)
    loaded = dm.state_dict()
    assert set(loaded) == keys
    assert all(torch.equal(loaded[k].float().cpu(), sd[k]) for k in keys)


@pytest.mark.parametrize("layout", ce.SD3_LAYOUTS)
@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("latent_hw", [(32, 32), (24, 40)], ids=["32x32", "24x40"])
def test_sample_finite(models, conds, layout, sampler_name, cfg, batch, latent_hw):
    out = ce.sample(
        models[layout], seed=11, steps=2, cfg=cfg, sampler_name=sampler_name, scheduler="simple",
        positive=conds["pos"], negative=conds["neg"], batch=batch, latent_hw=latent_hw,
    )
    assert out.shape == (batch, 16, *latent_hw)
    assert torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 50.0


def test_sample_is_deterministic_and_depends_on_inputs(models, conds):
    kw = dict(steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="simple", negative=conds["neg"], latent_hw=(24, 40))
    a = ce.sample(models["sd35_medium"], seed=5, positive=conds["pos"], **kw)
    b = ce.sample(models["sd35_medium"], seed=5, positive=conds["pos"], **kw)
    assert torch.equal(a, b)
    other_seed = ce.sample(models["sd35_medium"], seed=6, positive=conds["pos"], **kw)
    other_cond = ce.sample(models["sd35_medium"], seed=5, positive=ce.random_sd3_cond(99), **kw)
    other_model = ce.sample(models["sd3"], seed=5, positive=conds["pos"], **kw)
    for x in (other_seed, other_cond, other_model):
        assert (x - a).abs().max().item() > 1e-2


def test_denoise_and_latent_image(models, conds):
    start = ce.sample(models["sd3"], seed=1, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple",
                      positive=conds["pos"], negative=conds["neg"])
    out = ce.sample(models["sd3"], seed=2, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple",
                    positive=conds["pos"], negative=conds["neg"], latent_image=start, denoise=0.5)
    assert out.shape == start.shape and torch.isfinite(out).all()
    assert not torch.equal(out, start)


def test_per_image_conds(models):
    pos2 = ce.random_sd3_cond(3, batch=2, per_image=True)
    ctx, extra = pos2[0][0], pos2[0][1]
    assert ctx.shape == (2, 16, 64) and extra["pooled_output"].shape == (2, 64)
    assert not torch.equal(ctx[0], ctx[1])
    shared = ce.random_sd3_cond(3, batch=2, per_image=False)
    assert shared[0][0].shape == (1, 16, 64)

    # Row 0 of a batch-2 run with per-image conds == a batch-1 run with row 0's
    # cond (the CPU generator fills noise row-major, so row 0's noise matches).
    pos_a = ce.sd3_cond(ctx[:1], extra["pooled_output"][:1])
    neg2 = ce.random_sd3_cond(4, batch=2, per_image=True)
    neg_a = ce.sd3_cond(neg2[0][0][:1], neg2[0][1]["pooled_output"][:1])
    kw = dict(seed=9, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="simple")
    both = ce.sample(models["sd35_large"], positive=pos2, negative=neg2, batch=2, **kw)
    first = ce.sample(models["sd35_large"], positive=pos_a, negative=neg_a, batch=1, **kw)
    torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=1e-4)
    assert (both[0] - both[1]).abs().max().item() > 1e-2


# --------------------------------------------------------------------------
# call layouts
# --------------------------------------------------------------------------
def _run_recorded(model, conds, *, sampler_name="euler", cfg=5.0, batch=1, force_split_cfg=False, steps=STEPS):
    rec_model, rec = ce.record_calls(model)
    out = ce.sample(rec_model, seed=4, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler="simple",
                    positive=conds["pos"], negative=conds["neg"], batch=batch, force_split_cfg=force_split_cfg)
    return out, rec


@pytest.mark.parametrize("batch", [1, 2])
def test_layout_cfg1_only_cond(models, conds, batch):
    _, rec = _run_recorded(models["sd3"], conds, cfg=1.0, batch=batch)
    assert rec.layouts == [[0]] * STEPS
    assert all(c["x_shape"][0] == batch for c in rec.calls)
    assert all(len(c["sigmas"]) == batch for c in rec.calls)


@pytest.mark.parametrize("batch", [1, 2])
def test_layout_cfg_batches_uncond_first(models, conds, batch):
    _, rec = _run_recorded(models["sd3"], conds, cfg=5.0, batch=batch)
    assert rec.layouts == [[1, 0]] * STEPS
    assert all(c["x_shape"] == (2 * batch, 16, 32, 32) for c in rec.calls)
    # sigmas is per latent row, not per chunk; sample_sigmas is the schedule
    assert all(len(c["sigmas"]) == batch for c in rec.calls)
    sched = rec.calls[0]["sample_sigmas"]
    assert len(sched) == STEPS + 1 and sched[-1] == 0.0
    assert rec.first_sigmas == pytest.approx(sched[:-1])
    # uuids: one per chunk, distinct for cond/uncond, stable across steps
    uuids = rec.calls[0]["uuids"]
    assert len(uuids) == 2 and uuids[0] != uuids[1]
    assert all(c["uuids"] == uuids for c in rec.calls)


def test_force_split_cfg_separates_cond_and_uncond(models, conds):
    batched, rec_b = _run_recorded(models["sd35_medium"], conds, cfg=5.0, batch=2)
    split, rec_s = _run_recorded(models["sd35_medium"], conds, cfg=5.0, batch=2, force_split_cfg=True)
    assert len(rec_b.calls) == STEPS
    assert len(rec_s.calls) == 2 * STEPS
    assert rec_s.layouts == [[1], [0]] * STEPS
    assert all(c["x_shape"][0] == 2 for c in rec_s.calls)
    # one uuid per call, alternating uncond/cond, stable across steps
    # (uuids are minted per sampling run, so they differ from rec_b's)
    u_uncond, u_cond = rec_s.calls[0]["uuids"][0], rec_s.calls[1]["uuids"][0]
    assert u_uncond != u_cond
    assert [c["uuids"] for c in rec_s.calls] == [[u_uncond], [u_cond]] * STEPS
    # same maths: only float summation order differs
    torch.testing.assert_close(split, batched, atol=1e-4, rtol=1e-4)
    # cfg 1: nothing to split
    _, rec_1 = _run_recorded(models["sd35_medium"], conds, cfg=1.0, force_split_cfg=True)
    assert rec_1.layouts == [[0]] * STEPS


def test_heun_two_calls_per_step(models, conds):
    _, rec = _run_recorded(models["sd35_large"], conds, sampler_name="heun", cfg=5.0)
    sched = rec.calls[0]["sample_sigmas"]
    # 2 evals per step; the last step skips the corrector because the next sigma is 0
    assert len(rec.calls) == 2 * STEPS - 1
    assert rec.layouts == [[1, 0]] * (2 * STEPS - 1)
    expected = [sched[0]] + [s for s in sched[1:-1] for _ in range(2)]
    assert rec.first_sigmas == pytest.approx(expected)

    _, rec_split = _run_recorded(models["sd35_large"], conds, sampler_name="heun", cfg=5.0, force_split_cfg=True)
    assert len(rec_split.calls) == 2 * (2 * STEPS - 1)


def test_recorder_does_not_touch_the_original(models, conds):
    model = models["sd3"]
    ce.record_calls(model)
    ce.split_cfg(model)
    wrappers = model.model_options.get("transformer_options", {}).get("wrappers", {})
    assert not any(wrappers.get(t) for t in wrappers), wrappers


# --------------------------------------------------------------------------
# headless server
# --------------------------------------------------------------------------
SERVER_SEED = 21
SERVER_W, SERVER_H = 320, 192  # latent 24x40


@pytest.fixture(scope="module")
def server(comfy, comfy_server_factory, tmp_path_factory):
    model_path = ce.save_state_dict(
        ce.tiny_sd3_state_dict("sd35_medium", seed=3), tmp_path_factory.mktemp("models") / "cat_tiny_sd35m.safetensors"
    )
    srv = comfy_server_factory(custom_nodes=default_custom_nodes(pack=True), models={"diffusion_models": [model_path]})
    srv.model_name = model_path.name
    srv.model_path = model_path
    yield srv
    srv.stop()


def _graph(model_name, *, decode="CATFixtureDecode", pos=None, neg=None, cfg=5.0, sampler_name="euler", steps=STEPS,
           batch=1, save_latent_prefix=None):
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": pos or {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 1, "batch": batch}},
        "3": neg or {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 2, "batch": batch}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SERVER_W, "height": SERVER_H, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SERVER_SEED, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": decode, "inputs": {"samples": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if save_latent_prefix:
        g["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": save_latent_prefix}}
    return g


def test_server_lists_fixture_nodes(server):
    info = server.object_info()
    for node in ("CATFixtureRandomCond", "CATFixtureTextEncode", "CATFixtureDecode", "CATFixtureLatentRGB"):
        assert node in info, node
    assert info["CATFixtureRandomCond"]["output"] == ["CONDITIONING"]
    assert info["CATFixtureDecode"]["output"] == ["IMAGE"]
    assert server.model_name in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert server.custom_node_import_status().get("cat_fixture_nodes") is True
    assert (server.base_dir / "custom_nodes" / "ComfyUI-CAT-Pruning").resolve() == ce.REPO_ROOT
    assert server.object_info("CATFixtureRandomCond").keys() == {"CATFixtureRandomCond"}


def test_server_runs_graph_and_matches_in_process_sampling(server, tmp_path):
    decode = "CATFixtureDecode" if ce.TESTS_DIR.joinpath("fixtures", "tiny_t2i.py").is_file() else "CATFixtureLatentRGB"
    entry = server.run(_graph(server.model_name, decode=decode, batch=2, save_latent_prefix="latents/cat_smoke"),
                       timeout=120)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 2 and all(i["type"] == "temp" for i in images)
    assert all((server.base_dir / "temp" / i["subfolder"] / i["filename"]).is_file() for i in images)

    latent_file = entry["outputs"]["8"]["latents"][0]
    path = server.base_dir / "output" / latent_file["subfolder"] / latent_file["filename"]
    from safetensors.torch import load_file

    served = load_file(str(path))["latent_tensor"]
    local = ce.sample(ce.load_sd3(ce.tiny_sd3_state_dict("sd35_medium", seed=3)), seed=SERVER_SEED, steps=STEPS,
                      cfg=5.0, sampler_name="euler", scheduler="simple",
                      positive=ce.random_sd3_cond(1, batch=2), negative=ce.random_sd3_cond(2, batch=2),
                      batch=2, latent_hw=(SERVER_H // 8, SERVER_W // 8))
    assert served.shape == local.shape == (2, 16, SERVER_H // 8, SERVER_W // 8)
    torch.testing.assert_close(served, local, atol=1e-4, rtol=1e-4)


def test_server_text_encode_graph(server):
    if not ce.TESTS_DIR.joinpath("fixtures", "tiny_t2i.py").is_file():
        skip_for_missing("tests/fixtures/tiny_t2i.py not present")
    pos = {"class_type": "CATFixtureTextEncode", "inputs": {"text": "a big red circle on the left on a blue background"}}
    neg = {"class_type": "CATFixtureTextEncode", "inputs": {"text": ""}}
    entry = server.run(_graph(server.model_name, pos=pos, neg=neg, sampler_name="heun"), timeout=120)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"]["7"]["images"]) == 1


def test_server_reports_errors(server):
    bad_input = _graph(server.model_name)
    bad_input["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(ComfyServerError, match="HTTP 400"):
        server.post_prompt(bad_input)

    # context_dim 32 does not fit the model's 64-wide context embedder: fails at run time
    mismatched = _graph(server.model_name, pos={"class_type": "CATFixtureRandomCond",
                                                "inputs": {"seed": 1, "batch": 1, "context_dim": 32}})
    with pytest.raises(ComfyServerError, match="execution_error") as err:
        server.run(mismatched, timeout=120)
    assert "server log tail" in str(err.value)
    assert server.running
