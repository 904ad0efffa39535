"""The three CAT nodes in a real headless ComfyUI: registration and graphs through POST /prompt."""
from __future__ import annotations

import re

import pytest

from tests.host import comfy_env as ce
from tests.host.server import ComfyServerError, default_custom_nodes

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def server(comfy, comfy_server_factory, tmp_path_factory):
    path = ce.save_state_dict(ce.tiny_sd3_state_dict("sd3", seed=4), tmp_path_factory.mktemp("m") / "cat_tiny_sd3.safetensors")
    srv = comfy_server_factory(custom_nodes=default_custom_nodes(pack=True), models={"diffusion_models": [path]})
    srv.model_name = path.name
    yield srv
    srv.stop()


def graph(model_name, *, width=256, height=256, batch=1, keep=0.3, steps=6, warmup=2):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "CATPruningSettings", "inputs": {"keep_ratio": keep, "warmup_steps": warmup, "num_clusters": 8,
                                                            "stale_share": 0.75, "cluster_iters": 10, "feature_scale": 0.05, "seed": 0}},
        "3": {"class_type": "CATModelPatch", "inputs": {"model": ["1", 0], "settings": ["2", 0]}},
        "4": {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 1, "batch": batch}},
        "5": {"class_type": "CATFixtureRandomCond", "inputs": {"seed": 2, "batch": batch}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 3, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "CATStats", "inputs": {"model": ["3", 0], "samples": ["7", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 1]}},
        "10": {"class_type": "CATFixtureLatentRGB", "inputs": {"samples": ["7", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def test_nodes_are_registered(server):
    info = server.object_info()
    assert info["CATPruningSettings"]["display_name"] == "CAT Pruning Settings"
    assert info["CATModelPatch"]["display_name"] == "CAT Model Patch"
    assert info["CATStats"]["display_name"] == "CAT Stats"
    assert all(info[n]["category"] == "model_patches/CAT" for n in ("CATPruningSettings", "CATModelPatch", "CATStats"))
    settings_inputs = info["CATPruningSettings"]["input"]
    required = {**settings_inputs["required"], **settings_inputs.get("optional", {})}
    for name, default in (("keep_ratio", 0.3), ("warmup_steps", 0), ("num_clusters", 20), ("stale_share", 0.5)):
        assert required[name][1]["default"] == default and required[name][1]["tooltip"]
    assert info["CATPruningSettings"]["output"] == ["CAT_SETTINGS"]
    assert info["CATModelPatch"]["input"]["optional"]["settings"][0] == "CAT_SETTINGS"
    assert info["CATStats"]["output"] == ["STRING", "IMAGE", "IMAGE", "IMAGE", "IMAGE"]
    assert server.custom_node_import_status().get("ComfyUI-CAT-Pruning") is True


def test_workflow_runs_and_reports(server):
    entry = server.run(graph(server.model_name), timeout=180)
    assert entry["status"]["status_str"] == "success"
    report = entry["outputs"]["8"]["text"][0]
    assert "MACs saved" in report and "pruned" in report
    assert len(entry["outputs"]["9"]["images"]) == 2  # heatmap per model row (cond and uncond)
    # same graph at another size and batch: the cached patched MODEL is reused, state must not leak
    entry = server.run(graph(server.model_name, width=320, height=192, batch=2), timeout=180)
    assert entry["status"]["status_str"] == "success"
    assert re.search(r"step   0:\s+960 of\s+960", entry["outputs"]["8"]["text"][0])  # 2 images x 2 CFG halves x 12x20 tokens


def test_out_of_range_setting_is_refused_before_running(server):
    bad = graph(server.model_name, keep=1.5)
    with pytest.raises(ComfyServerError, match="keep_ratio"):
        server.post_prompt(bad)
