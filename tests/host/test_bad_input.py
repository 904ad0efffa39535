"""Bad input: every way a graph can hand CAT Pruning something it cannot use.

- CAT Pruning Settings at and beyond every bound (read from the node's own schema), and values of
  the wrong kind: accepted at the bounds; refused beyond with a ValueError that names the input
  (no traceback from deep inside the pack); through a headless server, out-of-range values are
  refused by POST /prompt with HTTP 400 naming the input.
- Settings at their bounds really sample.
- NaN / inf in the latent: what happens, and that the patch never makes a finite image non-finite.
- Unsupported models, a second CAT Model Patch, CAT Stats without a patch: clear errors.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest
import torch

from tests.host import comfy_env as ce
from tests.host.server import default_custom_nodes

pytestmark = pytest.mark.host




@pytest.fixture(scope="module")
def models(comfy):
    return {layout: ce.tiny_sd3(layout, seed=51) for layout in ce.SD3_LAYOUTS}


def run(model, *, batch=1, latent_hw=(12, 12), steps=6, cfg=4.0, latent_image=None, denoise=1.0, split=False):
    return ce.sample(model, seed=2, steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple",
                     positive=ce.random_sd3_cond(1, batch), negative=ce.random_sd3_cond(2, batch), batch=batch,
                     latent_hw=latent_hw, latent_image=latent_image, denoise=denoise, force_split_cfg=split)


# --------------------------------------------------------------------------------------------
# CAT Pruning Settings through the node
# --------------------------------------------------------------------------------------------
def _is_int(spec) -> bool:
    from comfy_api.latest import io

    return isinstance(spec, io.Int.Input)


@pytest.fixture(scope="module")
def schema(pack):
    """The settings node's inputs as declared in its schema (id, min, max, default, tooltip)."""
    return {i.id: i for i in pack.nodes.extension.CATPruningSettings.define_schema().inputs}


SETTING_NAMES = ("keep_ratio", "warmup_steps", "num_clusters", "stale_share", "cluster_iters", "feature_scale", "seed",
                 "cooldown_steps", "reuse_threshold", "extrapolation")
SWITCHES = ("pair_cfg", "refresh_first_block")
# Inputs added after the first release come last, so saved workflows keep their widget positions.
SCHEMA_ORDER = SETTING_NAMES[:7] + SWITCHES + ("cooldown_steps", "prune_any_sampler", "reuse_threshold", "execution",
                                               "extrapolation")


def defaults(schema) -> dict:
    return {name: spec.default for name, spec in schema.items() if name in SETTING_NAMES}


def execute_settings(pack, **values):
    return pack.nodes.extension.CATPruningSettings.execute(**values).args[0]


def test_schema_lists_every_setting_with_bounds(pack, schema):
    assert tuple(schema) == SCHEMA_ORDER
    for name in SWITCHES:
        assert schema[name].default is True and schema[name].tooltip and schema[name].optional, name
    assert schema["cooldown_steps"].optional  # prompts and workflows from before it still validate
    guard = schema["prune_any_sampler"]
    assert guard.default is False and guard.optional and guard.tooltip
    assert schema["reuse_threshold"].optional and schema["reuse_threshold"].default == 0  # off: saved workflows unchanged
    execution = schema["execution"]
    assert execution.optional and execution.default == "auto" and execution.tooltip
    assert list(execution.options) == list(pack.cat_core.config.EXECUTIONS)
    extrapolation = schema["extrapolation"]
    assert extrapolation.optional and extrapolation.advanced  # workflows saved before 0.5.2 still validate
    assert extrapolation.default == pack.cat_core.CATSettings().extrapolation
    for name, spec in schema.items():
        if name in SWITCHES or name in ("prune_any_sampler", "execution"):
            continue
        assert spec.min is not None and spec.max is not None and spec.min <= spec.default <= spec.max, name
        assert spec.tooltip, name


@pytest.mark.parametrize("name", SETTING_NAMES)
@pytest.mark.parametrize("end", ["min", "max"])
def test_setting_at_its_bound_is_accepted(pack, schema, name, end):
    value = getattr(schema[name], end)
    settings = execute_settings(pack, **{**defaults(schema), name: value})
    assert getattr(settings, name) == value


def _beyond(spec, end):
    """The nearest value outside the bound, and one far outside."""
    bound = getattr(spec, end)
    if _is_int(spec):
        return [bound - 1, bound - 1000] if end == "min" else [bound + 1, bound * 2 + 1000]
    near = math.nextafter(bound, -math.inf if end == "min" else math.inf)
    return [near, bound - 1.0] if end == "min" else [near, bound * 10 + 1.0]


def _check_refused(pack, schema, name, value):
    with pytest.raises(ValueError) as info:
        execute_settings(pack, **{**defaults(schema), name: value})
    message = str(info.value)
    assert name in message, message
    assert message.startswith("CAT Pruning Settings:"), message
    # a node-level message, not an error from inside the pack or the dataclass
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(message) < 200


@pytest.mark.parametrize("name,end", [
    (n, e) for n in SETTING_NAMES for e in ("min", "max")])
def test_setting_beyond_its_bound_is_refused_naming_it(pack, schema, name, end):
    for value in _beyond(schema[name], end):
        _check_refused(pack, schema, name, value)


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_setting_of_the_wrong_kind_is_refused_naming_it(pack, schema, name):
    bad = [float("nan"), float("inf"), -float("inf"), None, "0.5", True, [1]]
    if _is_int(schema[name]):
        bad += [2.5, 3.0]  # ComfyUI's server casts INT inputs; a direct caller gets a clear refusal
    for value in bad:
        _check_refused(pack, schema, name, value)


def test_execution_takes_its_options_and_refuses_others_naming_it(pack, schema):
    for value in schema["execution"].options:
        assert execute_settings(pack, **{**defaults(schema), "execution": value}).execution == value
    for value in ("cuda_graph", "", None, 1):
        _check_refused(pack, schema, "execution", value)


# the extremes that are allowed, combined: each must sample without error
EXTREMES = [
    dict(keep_ratio=0.01, warmup_steps=1, num_clusters=256, stale_share=0.0, cluster_iters=0, feature_scale=0.0),
    dict(keep_ratio=0.01, warmup_steps=1, num_clusters=1, stale_share=1.0, cluster_iters=100, feature_scale=100.0,
         seed=2**31 - 1),
    dict(keep_ratio=1.0, warmup_steps=1, num_clusters=256, stale_share=1.0, cluster_iters=100, feature_scale=100.0),
    dict(keep_ratio=0.5, warmup_steps=1000, num_clusters=1, stale_share=0.0, cluster_iters=0, feature_scale=0.0),
]


@pytest.mark.parametrize("values", EXTREMES, ids=lambda v: "-".join(f"{k}={v[k]}" for k in ("keep_ratio", "warmup_steps", "num_clusters")))
@pytest.mark.parametrize("layout", ["sd3", "sd35_medium"])
def test_settings_at_their_bounds_sample(pack, models, schema, values, layout):
    model = models[layout]
    settings = execute_settings(pack, **{**defaults(schema), **values})
    patched = pack.nodes.extension.CATModelPatch.execute(model, settings).args[0]
    reference = run(model, batch=2, split=True)
    out = run(patched, batch=2, split=True)
    stats = pack.nodes.patch.holder_of(patched).last_stats
    assert torch.isfinite(out).all() and stats.fallback_reason is None
    if values["keep_ratio"] == 1.0 or values["warmup_steps"] > 6:
        assert torch.equal(out, reference)
    else:
        pruned = [c for c in stats.calls if c.mode == "pruned"]
        assert pruned and all(c.tokens_computed == 2 * 1 for c in pruned)  # one token per image row


@pytest.mark.parametrize("layout", ["sd3", "sd35_medium"])
def test_extrapolation_from_the_node_moves_only_stale_tokens(pack, models, schema, layout):
    """The settings node's extrapolation reaches the run: with tokens left stale, 0 and 1 give
    different images; at keep 1.0 nothing is stale and every value gives the unpatched image."""
    model = models[layout]

    def sample(**values):
        settings = execute_settings(pack, **{**defaults(schema), "warmup_steps": 2, **values})
        return run(pack.nodes.extension.CATModelPatch.execute(model, settings).args[0], batch=2, split=True)

    reference = run(model, batch=2, split=True)
    served_cached, moved_on = sample(keep_ratio=0.3, extrapolation=0.0), sample(keep_ratio=0.3, extrapolation=1.0)
    assert torch.isfinite(moved_on).all() and not torch.equal(served_cached, moved_on)
    for value in (0.0, 1.0):
        assert torch.equal(sample(keep_ratio=1.0, extrapolation=value), reference)


# --------------------------------------------------------------------------------------------
# through a headless server: POST /prompt validation
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(comfy, comfy_server_factory, tmp_path_factory):
    path = ce.save_state_dict(ce.tiny_sd3_state_dict("sd3", seed=4),
                              tmp_path_factory.mktemp("bad-input-model") / "cat_bad_input_sd3.safetensors")
    # one intra-op thread: the server shares two cores with this process and other jobs
    srv = comfy_server_factory(custom_nodes=default_custom_nodes(pack=True), models={"diffusion_models": [path]},
                               env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    srv.model_name = path.name
    yield srv
    srv.stop()


def graph(model_name, **settings):
    values = {"keep_ratio": 0.3, "warmup_steps": 2, "num_clusters": 4, "stale_share": 0.75, "cluster_iters": 3,
              "feature_scale": 0.05, "seed": 0, **settings}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "CATPruningSettings", "inputs": values},
        "3": {"class_type": "CATModelPatch", "inputs": {"model": ["1", 0], "settings": ["2", 0]}},
        "4": {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 1, "batch": 1}},
        "5": {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 2, "batch": 1}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 3, "steps": 4, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
                                                   "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "CATStats", "inputs": {"model": ["3", 0], "samples": ["7", 0]}},
    }


def post(server, prompt, allow_nan=False):
    """POST /prompt; returns (HTTP status, parsed body)."""
    body = json.dumps({"prompt": prompt, "client_id": server.client_id}, allow_nan=allow_nan).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_error(server, prompt_id, timeout=120.0):
    """Wait for a prompt that must fail; return its execution_error message data."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.history(prompt_id).get(prompt_id)
        if entry is not None:
            errors = [m[1] for m in entry["status"].get("messages", []) if m and m[0] == "execution_error"]
            assert entry["status"]["status_str"] == "error" and errors, entry["status"]
            return errors[0]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s")


def test_server_accepts_every_bound(server, schema):
    queued = []
    for name in SETTING_NAMES:
        for end in ("min", "max"):
            value = getattr(schema[name], end)
            status, body = post(server, graph(server.model_name, **{name: value}))
            assert status == 200 and not body.get("node_errors"), (name, value, body)
            queued.append(body["prompt_id"])
    for prompt_id in queued:  # and every one of them runs to the end
        assert server.wait(prompt_id, timeout=180)["status"]["status_str"] == "success"


def test_server_refuses_out_of_range_with_http_400_naming_the_input(server, schema):
    for name in SETTING_NAMES:
        for end in ("min", "max"):
            value = _beyond(schema[name], end)[0]
            status, body = post(server, graph(server.model_name, **{name: value}))
            assert status == 400, (name, value, status, body)
            errors = body.get("node_errors", {}).get("2", {}).get("errors", [])
            assert errors, (name, value, body)
            text = json.dumps(errors)
            assert name in text, (name, value, text)
            assert any(e.get("extra_info", {}).get("input_name") == name for e in errors), errors


def test_server_refuses_wrong_type_with_http_400(server):
    status, body = post(server, graph(server.model_name, warmup_steps="eight"))
    assert status == 400 and "warmup_steps" in json.dumps(body.get("node_errors", {}))
    status, body = post(server, graph(server.model_name, keep_ratio="lots"))
    assert status == 400 and "keep_ratio" in json.dumps(body.get("node_errors", {}))


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_server_non_finite_setting_fails_with_the_node_message(server, value):
    """JSON has no NaN, but Python clients send it (json.dumps' default) and ComfyUI's min/max check
    lets NaN through (every comparison is False). The settings node then refuses it by name."""
    prompt = graph(server.model_name, keep_ratio=float(value.replace("Infinity", "inf")))
    status, body = post(server, prompt, allow_nan=True)
    print(f"keep_ratio={value}: HTTP {status}")
    if status == 400:  # refused at validation: fine, if it names the input
        assert "keep_ratio" in json.dumps(body)
        return
    assert status == 200, body
    error = wait_error(server, body["prompt_id"])
    assert error["node_type"] == "CATPruningSettings"
    assert error["exception_type"].endswith("ValueError")
    assert error["exception_message"].startswith("CAT Pruning Settings: keep_ratio must be a finite number")


def test_server_stats_without_patch_and_double_patch_fail_clearly(server):
    prompt = graph(server.model_name)
    prompt["8"]["inputs"]["model"] = ["1", 0]  # CAT Stats on the loader's (unpatched) model
    status, body = post(server, prompt)
    assert status == 200, body
    error = wait_error(server, body["prompt_id"])
    assert error["node_type"] == "CATStats"
    assert "no CAT Model Patch" in error["exception_message"]

    prompt = graph(server.model_name)
    prompt["9"] = {"class_type": "CATModelPatch", "inputs": {"model": ["3", 0], "settings": ["2", 0]}}
    prompt["7"]["inputs"]["model"] = ["9", 0]
    status, body = post(server, prompt)
    assert status == 200, body
    error = wait_error(server, body["prompt_id"])
    assert error["node_type"] == "CATModelPatch" and error["node_id"] == "9"
    assert "already has CAT Pruning" in error["exception_message"]
    assert error["exception_message"].startswith("CAT Model Patch:")


# --------------------------------------------------------------------------------------------
# NaN / inf latents
# --------------------------------------------------------------------------------------------
def _latent(batch=2, hw=(12, 12)):
    return torch.randn(batch, 16, *hw, generator=torch.Generator().manual_seed(6))


POISON = {
    "one_nan_value": lambda lat: lat[0, 3, 5, 7].fill_(float("nan")),
    "one_inf_value": lambda lat: lat[0, 0, 0, 0].fill_(float("inf")),
    "all_nan_image": lambda lat: lat[0].fill_(float("nan")),
    "huge_values": lambda lat: lat[0].mul_(1e30),
}


@pytest.mark.parametrize("split", [False, True], ids=["batched", "split"])
@pytest.mark.parametrize("poison", list(POISON))
def test_non_finite_latent(pack, models, poison, split):
    """What happens (img2img, denoise 0.6, batch of 2, image 0 poisoned):

    - unpatched: image 0 comes out entirely non-finite (one NaN token reaches every token through
      attention), image 1 stays finite;
    - keep 1.0: the same latent bit for bit (NaNs in the same places);
    - keep 0.3: no error and no fallback, image 0 non-finite as unpatched, and image 1 is exactly
      what it is when image 0 is clean: per-image selection, clustering and caches keep one bad
      image from touching the others, so the patch never makes a finite image non-finite.
    """
    model = models["sd35_medium"]
    clean = _latent()
    bad = clean.clone()
    POISON[poison](bad)
    kw = dict(batch=2, denoise=0.6, steps=8, split=split)

    unpatched = run(model, latent_image=bad, **kw)
    assert not torch.isfinite(unpatched[0]).any() and torch.isfinite(unpatched[1]).all()

    exact = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=1.0, warmup_steps=2))
    out = run(exact, latent_image=bad.clone(), **kw)
    assert torch.equal(out.isnan(), unpatched.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(unpatched))

    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=2)
    pruned = pack.nodes.patch.apply_cat(model, settings)
    out = run(pruned, latent_image=bad.clone(), **kw)
    stats = pack.nodes.patch.holder_of(pruned).last_stats
    assert stats.fallback_reason is None and any(c.mode == "pruned" for c in stats.calls)
    assert not torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).all()
    reference_clean = run(pack.nodes.patch.apply_cat(model, settings), latent_image=clean, **kw)
    assert torch.equal(out[1], reference_clean[1])


def test_large_but_finite_latent_stays_finite(pack, models):
    model = models["sd3"]
    latent = _latent() * 1e3
    reference = run(model, latent_image=latent, denoise=0.6, batch=2)
    assert torch.isfinite(reference).all()
    pruned = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=2))
    assert torch.isfinite(run(pruned, latent_image=latent, denoise=0.6, batch=2)).all()


def test_nan_conditioning_on_one_image(pack, models):
    """A NaN in one image's prompt embedding: that image is NaN unpatched too; the other is untouched."""
    model = models["sd3"]
    positive = ce.random_sd3_cond(1, 2)
    positive[0][0] = positive[0][0].clone()
    positive[0][0][0, 2, 5] = float("nan")

    def go(m):
        return ce.sample(m, seed=2, steps=6, cfg=4.0, sampler_name="euler", scheduler="simple", positive=positive,
                         negative=ce.random_sd3_cond(2, 2), batch=2, latent_hw=(12, 12))

    def go_clean(m):
        return ce.sample(m, seed=2, steps=6, cfg=4.0, sampler_name="euler", scheduler="simple",
                         positive=ce.random_sd3_cond(1, 2), negative=ce.random_sd3_cond(2, 2), batch=2, latent_hw=(12, 12))

    unpatched = go(model)
    assert not torch.isfinite(unpatched[0]).all() and torch.isfinite(unpatched[1]).all()
    settings = pack.cat_core.CATSettings(keep_ratio=0.3, warmup_steps=2)
    out = go(pack.nodes.patch.apply_cat(model, settings))
    assert torch.isfinite(out[1]).all()
    assert torch.equal(out[1], go_clean(pack.nodes.patch.apply_cat(model, settings))[1])


# --------------------------------------------------------------------------------------------
# models the pack cannot patch, double patches, CAT Stats without a patch
# --------------------------------------------------------------------------------------------
def _node_patch(pack, model):
    return pack.nodes.extension.CATModelPatch.execute(model).args[0]


def _assert_clear(error_info, *needles):
    message = str(error_info.value)
    assert message.startswith("CAT Model Patch:"), message
    for needle in needles:
        assert needle in message, message
    assert error_info.value.__cause__ is None and error_info.value.__suppress_context__


def test_unsupported_diffusion_model_object(pack, models):
    other = models["sd3"].clone()
    other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as info:
        _node_patch(pack, other)
    _assert_clear(info, "does not support", "Linear", "supported:", "SD3", "SD3.5")


def test_unsupported_model_family_auraflow(pack, comfy):
    """AuraFlow: another MMDiT-style flow-matching model (its module is even called MMDiT)."""
    import comfy.supported_models

    config = comfy.supported_models.AuraFlow({
        "cond_seq_dim": 64, "max_seq": 64, "n_double_layers": 1, "n_layers": 2, "dim": 64, "n_heads": 2,
        "global_conddim": 64, "in_channels": 4, "out_channels": 4, "patch_size": 2})
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        _node_patch(pack, model)
    _assert_clear(info, "AuraFlow", "supported:", "SD3")


def test_sd3_with_non_flow_model_sampling(pack, models):
    """ModelSamplingDiscrete (eps) put before the patch: refused, the message names flow matching."""
    import comfy_extras.nodes_model_advanced as nodes_model_advanced

    eps = nodes_model_advanced.ModelSamplingDiscrete().patch(models["sd3"], "eps", False)[0]
    with pytest.raises(ValueError) as info:
        _node_patch(pack, eps)
    _assert_clear(info, "flow-matching", "Supported:")


@pytest.mark.parametrize("between", ["nothing", "clone", "lora", "model_sampling_sd3"])
def test_second_cat_model_patch_is_refused(pack, models, between):
    import comfy.sd
    import comfy_extras.nodes_model_advanced as nodes_model_advanced

    once = _node_patch(pack, models["sd3"])
    if between == "clone":
        once = once.clone()
    elif between == "lora":
        once, _ = comfy.sd.load_lora_for_models(once, None, {}, 1.0, 0)
    elif between == "model_sampling_sd3":
        once = nodes_model_advanced.ModelSamplingSD3().patch(once, 3.0)[0]
    with pytest.raises(ValueError) as info:
        _node_patch(pack, once)
    _assert_clear(info, "already has CAT Pruning")
    # the first patch still works
    assert torch.isfinite(run(once)).all()


def test_cat_stats_on_unpatched_model(pack, models):
    samples = {"samples": torch.zeros(1, 16, 12, 12)}
    with pytest.raises(ValueError) as info:
        pack.nodes.extension.CATStats.execute(models["sd3"], samples)
    message = str(info.value)
    assert message.startswith("CAT Stats:") and "no CAT Model Patch" in message, message
    assert "CAT Model Patch" in message


def test_cat_stats_before_any_run_and_after_a_mismatched_run(pack, models):
    """No run yet: a report saying so (no error). Samples of another size than the last run: the maps
    are drawn at the samples' size, no error."""
    ext = pack.nodes.extension
    patched = _node_patch(pack, models["sd3"])
    out = ext.CATStats.execute(patched, {"samples": torch.zeros(1, 16, 12, 12)})
    assert "no run recorded yet" in out.args[0]
    run(patched, latent_hw=(12, 12))
    out = ext.CATStats.execute(patched, {"samples": torch.zeros(3, 16, 10, 20)})
    report, *images = out.args
    assert isinstance(report, str)
    assert all(torch.isfinite(img).all() and img.ndim == 4 for img in images)


@pytest.mark.parametrize("settings", [{"keep_ratio": 0.5}, 0.5, "keep_ratio=0.5"], ids=["dict", "float", "str"])
def test_cat_model_patch_with_settings_of_the_wrong_type(pack, models, settings):
    try:
        patched = pack.nodes.extension.CATModelPatch.execute(models["sd3"], settings).args[0]
    except ValueError as error:  # refused at patch time: fine, if it says which input
        assert str(error).startswith("CAT Model Patch:") and "settings" in str(error), str(error)
        return
    # or accepted as a settings dict: then it must be real settings that sample
    assert isinstance(settings, dict), "a non-dict settings value was accepted"
    assert isinstance(pack.nodes.patch.holder_of(patched).settings, pack.cat_core.CATSettings)
    assert torch.isfinite(run(patched)).all()


def test_server_settings_literal_instead_of_link(server):
    prompt = graph(server.model_name)
    prompt["3"]["inputs"]["settings"] = {"keep_ratio": 0.5}
    status, body = post(server, prompt)
    if status == 400:
        assert "settings" in json.dumps(body)
        return
    assert status == 200, body
    entry = None
    import time

    deadline = time.monotonic() + 120
    while entry is None and time.monotonic() < deadline:
        entry = server.history(body["prompt_id"]).get(body["prompt_id"])
        time.sleep(0.1)
    errors = [m[1] for m in entry["status"].get("messages", []) if m and m[0] == "execution_error"]
    if not errors:  # accepted and converted: fine
        return
    assert errors[0]["node_type"] == "CATModelPatch", (errors[0]["node_type"], errors[0]["exception_message"])
    assert "settings" in errors[0]["exception_message"]
