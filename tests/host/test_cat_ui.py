"""The visual side in a real ComfyUI: shipped workflows, CAT Stats / CAT Compare outputs, the web extension.

One headless server for the module, started WITH ComfyUI's frontend (the installed
comfyui-frontend-package) when it is installed, so the same server answers POST /prompt and
serves the page for the browser test:

* every shipped workflow (workflows/*.json, UI format) converts to API format through the
  server's /object_info (tests/host/workflow_api.py), gets a tiny random model instead of the
  real one (``TINY``: SD3.5, a tiny file and the CATFixture text-encode / decode nodes; Flux, a
  tiny file in the UNETLoader, CATFixtureRandomCond for the text encoder, CATFixtureLatentRGB for
  the VAE; Qwen-Image and PixArt-Σ, the same with CATFixtureTinyQwen / CATFixtureTinyPixArt for
  the UNETLoader), and runs to
  completion, pruning; ``EXPECTED`` says what each must hold (ComfyUI's own template for its
  model), so a new workflow adds one ``Shipped`` row (and a ``TINY`` row for a new family);
* in headless Chromium (playwright, system chromium, nothing downloaded) the frontend loads each
  workflow with every node type registered, the CAT nodes show their widgets, the converter agrees
  with the frontend's own graphToPrompt, and after a run queued with the page's client id the
  CAT Stats widget shows a running state and then draws its chart. Screenshots go to the test's
  tmp dir; the Stats one is also copied to bench_out/ui_stats.png (git-ignored).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

import pytest

from tests.host.locate import skip_for_missing
from tests.host import comfy_env as ce
from tests.host import workflow_api as wa
from tests.host.server import REPO_ROOT, ComfyServer, ComfyServerError, default_custom_nodes

pytestmark = pytest.mark.host

WORKFLOWS_DIR = REPO_ROOT / "workflows"
SHIPPED = sorted(p.name for p in WORKFLOWS_DIR.glob("*.json"))
#: the size and length every tiny stand-in run is shrunk to (6 steps, warm-up 2, cool-down 1: 3 pruned calls)
TINY_RUN = dict(size=128, steps=6, warmup=2)


@dataclass(frozen=True)
class Tiny:
    """How a tiny random model stands in for a family's real one on the test server."""
    #: (converted API prompt, {layout: tiny model file}) -> the prompt the server runs (a ``wa.substitute_*``)
    substitute: Callable[..., dict]
    #: node types the substituted prompt must hold (besides the CAT nodes)
    fixtures: frozenset[str]
    #: the tiny model file the UNETLoader loads from models/diffusion_models/; None: a fixture node builds it
    state_dict: Callable[[], dict] | None = None


@dataclass(frozen=True)
class Shipped:
    """What one shipped workflow must hold: ComfyUI's own template for its model, and its tiny stand-in."""
    tiny: str  # key of TINY
    #: {loader type: [widgets_values]}: every model-file loader of the workflow, one node each
    loaders: dict[str, list]
    #: KSampler widgets_values[2:6] of ComfyUI's template: steps, cfg, sampler, scheduler
    sampler: list
    #: the node type the reference sampler's (unpatched) model comes from; CAT Model Patch takes the same
    unpatched_model: str
    #: the empty-latent node (EmptyLatentImage for 4-channel latents) and its width, height
    size: tuple[int, int] = (1024, 1024)
    latent: str = "EmptySD3LatentImage"
    #: the node type both samplers' positive prompt comes from
    positive: str = "CLIPTextEncode"
    #: {node type: [widgets_values]} of other template nodes, one node each (FluxGuidance, ModelSampling*)
    others: dict[str, list] = field(default_factory=dict)


TINY = {
    "sd35_medium": Tiny(lambda api, files, **kw: wa.substitute_tiny(api, files["sd35_medium"].name, **kw),
                        frozenset({"UNETLoader", "CATFixtureTextEncode", "CATFixtureDecode"}),
                        lambda: ce.tiny_sd3_state_dict("sd35_medium", seed=7)),
    "sd35_large": Tiny(lambda api, files, **kw: wa.substitute_tiny(api, files["sd35_large"].name, **kw),
                       frozenset({"UNETLoader", "CATFixtureTextEncode", "CATFixtureDecode"}),
                       lambda: ce.tiny_sd3_state_dict("sd35_large", seed=7)),
    "flux": Tiny(lambda api, files, **kw: wa.substitute_tiny_flux(api, files["flux"].name, **kw),
                 frozenset({"UNETLoader", "CATFixtureRandomCond", "CATFixtureLatentRGB", "FluxGuidance"}),
                 lambda: ce.tiny_flux_state_dict("flux", seed=7)),
    # ComfyUI's detection of a Qwen-Image file keeps the real widths: a fixture node builds the tiny model
    "qwen_image": Tiny(lambda api, files, **kw: wa.substitute_tiny_qwen(api, seed=7, **kw),
                       frozenset({"CATFixtureTinyQwen", "CATFixtureRandomCond", "CATFixtureLatentRGB", "ModelSamplingAuraFlow"})),
    # likewise PixArt (its detection fixes the real widths); the random cond's context at the tiny caption width.
    # PixArtMS derives its position embedding's base size and interpolation from the latent size, which
    # rounds to 0 below a 40x40 latent (division by zero, or an infinite embedding): 320x320 images here
    "pixart_sigma": Tiny(lambda api, files, **kw: wa.substitute_tiny_pixart(api, seed=7, **{**kw, "size": 320}),
                         frozenset({"CATFixtureTinyPixArt", "CATFixtureRandomCond", "CATFixtureLatentRGB", "EmptyLatentImage"})),
}
SD35_MEDIUM = "CAT Pruning - SD3.5 Medium - needs sd3.5_medium_incl_clips_t5xxlfp8scaled.json"
SD35_SAMPLER = [20, 4.01, "euler", "sgm_uniform"]  # ComfyUI's SD3.5 template
EXPECTED = {
    SD35_MEDIUM: Shipped("sd35_medium", {"CheckpointLoaderSimple": ["sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"]},
                         SD35_SAMPLER, "CheckpointLoaderSimple"),
    "CAT Pruning - SD3.5 Large - needs sd3.5_large_fp8_scaled.json": Shipped(
        "sd35_large", {"CheckpointLoaderSimple": ["sd3.5_large_fp8_scaled.safetensors"]}, SD35_SAMPLER, "CheckpointLoaderSimple"),
    # ComfyUI's Flux dev template: guidance-distilled, cfg 1, FluxGuidance on the positive prompt
    "CAT Pruning - Flux.1 dev - needs flux1-dev, clip_l, t5xxl_fp16, ae.json": Shipped(
        "flux", {"UNETLoader": ["flux1-dev.safetensors", "default"],
                 "DualCLIPLoader": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"],
                 "VAELoader": ["ae.safetensors"]},
        [20, 1, "euler", "simple"], "UNETLoader", positive="FluxGuidance", others={"FluxGuidance": [3.5]}),
    # ComfyUI's Qwen-Image template without its 8-step Lightning LoRA (the automatic schedule leaves 8 steps unpatched)
    "CAT Pruning - Qwen-Image - needs qwen_image_fp8_e4m3fn, qwen_2.5_vl_7b_fp8_scaled, qwen_image_vae.json": Shipped(
        "qwen_image", {"UNETLoader": ["qwen_image_fp8_e4m3fn.safetensors", "default"],
                       "CLIPLoader": ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"],
                       "VAELoader": ["qwen_image_vae.safetensors"]},
        [20, 2.5, "euler", "simple"], "ModelSamplingAuraFlow", size=(1328, 1328), others={"ModelSamplingAuraFlow": [3.1]}),
    # ComfyUI has no PixArt template or example: PixArt-Σ's own defaults (20 steps, cfg 4.5), KSampler's euler / normal
    "CAT Pruning - PixArt-Sigma - needs PixArt-Sigma-XL-2-1024-MS, t5xxl_fp16, sdxl_vae.json": Shipped(
        "pixart_sigma", {"UNETLoader": ["PixArt-Sigma-XL-2-1024-MS.pth", "default"],
                         "CLIPLoader": ["t5xxl_fp16.safetensors", "pixart", "default"],
                         "VAELoader": ["sdxl_vae.safetensors"]},
        [20, 4.5, "euler", "normal"], "UNETLoader", latent="EmptyLatentImage"),
}
#: node types that load model files (each with download entries in properties.models)
LOADER_TYPES = frozenset({"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader"})
#: model file names the loaders take (the frontend's missing-models dialog offers downloads of these)
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
#: the folder the headless server gives the pack, which the template browser shows as its category
PACK_TEMPLATES = "ComfyUI-CAT-Pruning"
CAT_TYPES = ("CATPruningSettings", "CATModelPatch", "CATStats", "CATCompare")
STATS_IMAGE_OUTPUTS = ("heatmap", "staleness", "clusters", "selections")
BENCH_OUT = REPO_ROOT / "bench_out"


def _load(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8"))


def _frontend_installed() -> bool:
    return importlib.util.find_spec("comfyui_frontend_package") is not None


class FrontendServer(ComfyServer):
    """ComfyServer that serves the installed frontend (no --front-end-root) with first-run dialogs off."""

    with_frontend = True

    def command(self) -> list[str]:
        cmd = super().command()
        if self.with_frontend:
            i = cmd.index("--front-end-root")
            del cmd[i:i + 2]
        return cmd

    def _layout(self) -> None:
        super()._layout()
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({
            "Comfy.TutorialCompleted": True,  # no templates browser on first start
            "Comfy.Workflow.ShowMissingModelsWarning": False,  # the real checkpoints are absent on purpose
            "Comfy.Workflow.ShowMissingNodesWarning": True,
        }))


@pytest.fixture(scope="module")
def tiny_models(comfy, tmp_path_factory) -> dict[str, Path]:
    """{layout: tiny random model file} for the layouts the shipped workflows stand for."""
    folder = tmp_path_factory.mktemp("ui-models")
    layouts = sorted({shipped.tiny for shipped in EXPECTED.values() if TINY[shipped.tiny].state_dict is not None})
    return {layout: ce.save_state_dict(TINY[layout].state_dict(), folder / f"cat_ui_tiny_{layout}.safetensors")
            for layout in layouts}


@pytest.fixture(scope="module")
def server(comfyui_root, tiny_models, tmp_path_factory):
    srv = FrontendServer(
        comfyui_root,
        base_dir=tmp_path_factory.mktemp("ui-base"),
        custom_nodes=default_custom_nodes(pack=True),
        models={"diffusion_models": list(tiny_models.values())},
    )
    srv.with_frontend = _frontend_installed()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def _api_for(name: str, object_info: dict, tiny_models: dict[str, Path]) -> dict:
    return TINY[EXPECTED[name].tiny].substitute(wa.ui_to_api(_load(name), object_info), tiny_models, **TINY_RUN)


def _nodes_of(workflow: dict, type_: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == type_]


# ------------------------------------------------------------------------------------ shape
def test_shipped_workflows_are_complete_ui_workflows(server):
    assert set(SHIPPED) == set(EXPECTED), f"workflows/ holds {SHIPPED}"
    templates = server.get("/workflow_templates")  # ComfyUI lists them in its templates browser
    assert sorted(templates.get(PACK_TEMPLATES, [])) == sorted(Path(n).stem for n in EXPECTED)
    for name, shipped in EXPECTED.items():
        wf = _load(name)
        assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(wf)
        nodes = {n["id"]: n for n in wf["nodes"]}
        links = {link[0]: link for link in wf["links"]}
        source = lambda node, input_name: nodes[links[next(i for i in node["inputs"] if i["name"] == input_name)["link"]][1]]
        assert {n["type"] for n in wf["nodes"] if n["type"] in LOADER_TYPES} == set(shipped.loaders), name
        for type_, values in {**shipped.loaders, **shipped.others}.items():
            assert [n["widgets_values"] for n in _nodes_of(wf, type_)] == [values], (name, type_)
        for t in CAT_TYPES:
            assert len(_nodes_of(wf, t)) == 1, (name, t)
        samplers = _nodes_of(wf, "KSampler")
        assert len(samplers) == 2
        patched, plain = sorted(samplers, key=lambda n: source(n, "model")["type"] != "CATModelPatch")
        assert source(patched, "model")["type"] == "CATModelPatch", name
        # the reference samples the very model CAT Model Patch patches
        assert source(plain, "model")["type"] == shipped.unpatched_model, name
        assert source(_nodes_of(wf, "CATModelPatch")[0], "model")["id"] == source(plain, "model")["id"], name
        # same seed, fixed, same settings: the unpatched image is the reference of the patched one
        assert patched["widgets_values"] == plain["widgets_values"] and patched["widgets_values"][1] == "fixed"
        assert patched["widgets_values"][2:6] == shipped.sampler, name
        for sampler in (patched, plain):
            assert source(sampler, "positive")["type"] == shipped.positive, name
        assert [n["widgets_values"][:2] for n in wf["nodes"] if n["type"].startswith("Empty")] == [list(shipped.size)], name
        assert _nodes_of(wf, shipped.latent), (name, shipped.latent)
        settings = _nodes_of(wf, "CATPruningSettings")[0]["widgets_values"]
        assert len(settings) == 14 and settings[1] == 0, (name, settings)  # every widget saved, automatic warm-up
        # every CAT Stats image output ends in a PreviewImage; CAT Compare gets the two decodes
        stats = _nodes_of(wf, "CATStats")[0]
        outs = {o["name"]: o for o in stats["outputs"]}
        for image in STATS_IMAGE_OUTPUTS:
            targets = [nodes[links[lid][3]]["type"] for lid in outs[image]["links"]]
            assert targets == ["PreviewImage"], (name, image)
        compare = _nodes_of(wf, "CATCompare")[0]
        sources = {i["name"]: nodes[links[i["link"]][1]] for i in compare["inputs"] if i.get("link") is not None}
        assert sources["patched"]["type"] == sources["unpatched"]["type"] == "VAEDecode"
        assert {links[i["link"]][1] for i in sources["patched"]["inputs"] if i["name"] == "samples"} == {patched["id"]}


def test_converter_reads_widgets_links_and_ui_nodes(object_info):
    api = wa.ui_to_api(_load(SD35_MEDIUM), object_info)
    assert "MarkdownNote" not in {n["class_type"] for n in api.values()}
    sampler = next(n for n in api.values() if n["_meta"]["title"] == "Sample with CAT")
    assert sampler["inputs"]["seed"] == 585483408983215 and sampler["inputs"]["steps"] == 20  # "fixed" skipped
    settings = next(n for n in api.values() if n["class_type"] == "CATPruningSettings")
    assert settings["inputs"] == {"keep_ratio": 0.3, "warmup_steps": 0, "num_clusters": 20, "stale_share": 0.5,
                                  "cluster_iters": 10, "feature_scale": 0.05, "seed": 0, "pair_cfg": True,
                                  "refresh_first_block": True, "cooldown_steps": 1, "prune_any_sampler": False,
                                  "reuse_threshold": 0.0, "execution": "auto", "extrapolation": 0.5}
    assert api[sampler["inputs"]["model"][0]]["class_type"] == "CATModelPatch"
    with pytest.raises(wa.MissingNodeError, match="NoSuchNode"):
        wa.ui_to_api({"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}, object_info)


# ------------------------------------------------------------------------------------ POST /prompt
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_workflow_runs_with_a_tiny_model(server, object_info, tiny_models, name):
    api = _api_for(name, object_info, tiny_models)
    assert {n["class_type"] for n in api.values()} >= {*TINY[EXPECTED[name].tiny].fixtures, *CAT_TYPES}
    entry = server.run(api, timeout=240)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    wf = _load(name)
    stats_id = str(_nodes_of(wf, "CATStats")[0]["id"])
    summary = outputs[stats_id]["cat_stats"][0]
    assert summary["has_run"] and summary["pruned_calls"] == 3 and 0 < summary["macs_saved"] < 1  # 6 steps, warm-up 2, cool-down 1
    assert "MACs saved" in outputs[stats_id]["text"][0]
    stats = _nodes_of(wf, "CATStats")[0]
    links = {link[0]: link for link in wf["links"]}
    for out in stats["outputs"][1:]:
        preview = str(links[out["links"][0]][3])
        assert outputs[preview]["images"], (name, out["name"])
    compare = outputs[str(_nodes_of(wf, "CATCompare")[0]["id"])]
    assert "PSNR" in compare["text"][0] and compare["cat_compare"][0]["images"] == 1
    save = outputs[str(_nodes_of(wf, "SaveImage")[0]["id"])]
    assert save["images"][0]["type"] == "output"


def test_compare_node_reports_identical_images_and_refuses_different_sizes(server):
    def graph(w2, h2):
        return {
            "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
            "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": w2, "height": h2, "batch_size": 2}},
            "3": {"class_type": "CATFixtureLatentRGB", "inputs": {"samples": ["1", 0]}},
            "4": {"class_type": "CATFixtureLatentRGB", "inputs": {"samples": ["2", 0]}},
            "5": {"class_type": "CATCompare", "inputs": {"patched": ["3", 0], "unpatched": ["4", 0], "amplify": 8.0}},
        }

    entry = server.run(graph(64, 64), timeout=60)
    out = entry["outputs"]["5"]
    assert "image 1: identical" in out["text"][0] and "image 2: identical" in out["text"][0]
    summary = out["cat_compare"][0]
    assert summary["identical"] == [True, True] and summary["psnr"] == [None, None] and summary["psnr_mean"] == 100.0
    with pytest.raises(ComfyServerError, match=r"CAT Compare: the images differ in size"):
        server.run(graph(64, 48), timeout=60)


# ------------------------------------------------------------------------------------ browser
def _chromium() -> str | None:
    for candidate in (os.environ.get("CAT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if candidate:
            path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
            if path:
                return path
    return None


@pytest.fixture(scope="module")
def page(server):
    if not server.with_frontend:
        skip_for_missing("comfyui-frontend-package is not installed: ComfyUI cannot serve its frontend")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_for_missing("playwright is not installed (pip install playwright, or bash tests/setup.sh; a system chromium is used, nothing downloaded)")
    executable = _chromium()
    if executable is None:
        skip_for_missing("no chromium found (apt-get install chromium, or set CAT_CHROMIUM to a Chromium/Chrome binary)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            pg = browser.new_page(viewport={"width": 1800, "height": 1100})
            pg.console_errors = []
            pg.on("pageerror", lambda exc: pg.console_errors.append(str(exc)))
            pg.responses = []  # (status, decoded url) of everything the page fetched
            pg.on("response", lambda r: pg.responses.append((r.status, unquote(r.url))))
            pg.goto(server.url)
            pg.wait_for_function("() => window.app?.graph && window.LiteGraph && 'CATStats' in LiteGraph.registered_node_types"
                                 " && window.comfyAPI?.api?.api?.clientId", timeout=120_000)
            # record any missing-nodes report of the frontend
            pg.evaluate("""() => { window.__catMissing = [];
                const orig = app.showMissingNodesError.bind(app);
                app.showMissingNodesError = (types) => { window.__catMissing.push(...types); return orig(types); }; }""")
            yield pg
        finally:
            browser.close()


LOAD_AND_INSPECT = """async (wf) => {
  window.__catMissing = [];
  await app.loadGraphData(wf, true, true, null, {showMissingModelsDialog: false});
  await new Promise((r) => setTimeout(r, 300));
  app.canvas.setDirty(true, true);
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const widgetsOf = (n) => (n.widgets ?? []).map((w) => w.name);
  const byType = Object.fromEntries(nodes.map((n) => [n.type, n]));
  const statsNode = byType["CATStats"];
  const view = statsNode?.widgets?.find((w) => w.name === "cat_stats_view");
  const el = view?.element;
  return {
    unregistered: [...new Set(nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types)))],
    missing: window.__catMissing,
    errored: nodes.filter((n) => n.has_errors).map((n) => n.type),
    widgets: Object.fromEntries(["CATPruningSettings", "CATModelPatch", "CATStats", "CATCompare"].map((t) => [t, widgetsOf(byType[t] ?? {})])),
    statsView: el ? {inDocument: document.body.contains(el), width: el.clientWidth, height: el.clientHeight,
                     state: el.dataset.state, hasCanvas: !!el.querySelector("canvas")} : null,
    compareView: !!byType["CATCompare"]?.widgets?.find((w) => w.name === "cat_compare_view")?.element,
    missingDialog: !!document.querySelector('[aria-labelledby*="missing"], .comfy-missing-nodes'),
    prompt: (await app.graphToPrompt()).output,
    serialized: app.graph.serialize(),
  };
}"""


def _focus(page, node_ids, margin=20):
    """Zoom the canvas (at most 1:1) onto node_ids, clear of the side bar and top bar; return the page clip."""
    return page.evaluate("""([ids, margin]) => {
      const nodes = ids.map((id) => app.graph.getNodeById(id));
      const x0 = Math.min(...nodes.map((n) => n.pos[0])) - margin, y0 = Math.min(...nodes.map((n) => n.pos[1])) - 30 - margin;
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + margin, y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + margin;
      const rect = app.canvas.canvas.getBoundingClientRect();
      const left = 90, top = 100;  // page pixels left free for the frontend's side bar, tabs and menu
      const scale = Math.min(1, (rect.width - left - 10) / (x1 - x0), (rect.height - top - 10) / (y1 - y0));
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [(left - rect.left) / scale - x0, (top - rect.top) / scale - y0];
      app.canvas.setDirty(true, true);
      return {x: left, y: top, width: (x1 - x0) * scale, height: (y1 - y0) * scale};
    }""", [node_ids, margin])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_frontend_loads_shipped_workflow(page, object_info, name, tmp_path):
    wf = _load(name)
    got = page.evaluate(LOAD_AND_INSPECT, wf)
    assert got["unregistered"] == [] and got["missing"] == [] and got["errored"] == [], got
    assert not got["missingDialog"]
    assert got["widgets"]["CATPruningSettings"] == ["keep_ratio", "warmup_steps", "num_clusters", "stale_share",
                                                     "cluster_iters", "feature_scale", "seed", "pair_cfg",
                                                     "refresh_first_block", "cooldown_steps", "prune_any_sampler",
                                                     "reuse_threshold", "execution", "extrapolation"]  # no randomize control on the k-means seed
    assert got["widgets"]["CATModelPatch"] == []
    assert got["widgets"]["CATStats"] == ["cat_stats_view"] and got["widgets"]["CATCompare"] == ["amplify", "cat_compare_view"]
    view = got["statsView"]
    assert view and view["inDocument"] and view["hasCanvas"] and view["width"] > 200 and view["height"] > 100, view
    assert got["compareView"]
    # the converter gives exactly what the frontend itself would queue
    strip = lambda prompt: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
    assert strip(wa.ui_to_api(wf, object_info)) == strip(got["prompt"])
    # the extension's DOM widgets are not saved into widgets_values
    saved = {n["id"]: n.get("widgets_values") for n in got["serialized"]["nodes"]}
    assert all(saved[n["id"]] == n.get("widgets_values") for n in wf["nodes"]), "loading and saving changed widget values"
    page.wait_for_timeout(300)
    page.screenshot(path=str(tmp_path / f"{Path(name).stem}_loaded.png"))
    assert not page.console_errors, page.console_errors


def test_workflow_saved_before_the_new_inputs_keeps_its_values(page, object_info):
    """A 0.1.0 workflow (no refresh_first_block / cooldown_steps) loads with its saved values in
    place, the new inputs at their defaults, and queues without errors."""
    wf = _load(SD35_MEDIUM)
    node = _nodes_of(wf, "CATPruningSettings")[0]
    node["inputs"] = [i for i in node["inputs"] if i["name"] not in ("refresh_first_block", "cooldown_steps")]
    node["widgets_values"] = [0.45, 6, 12, 0.5, 7, 0.1, 3, False]  # 0.1.0's eight widgets, none at its default
    got = page.evaluate(LOAD_AND_INSPECT, wf)
    assert got["unregistered"] == [] and got["errored"] == [], got
    inputs = got["prompt"][str(node["id"])]["inputs"]
    assert inputs == {"keep_ratio": 0.45, "warmup_steps": 6, "num_clusters": 12, "stale_share": 0.5, "cluster_iters": 7,
                      "feature_scale": 0.1, "seed": 3, "pair_cfg": False, "refresh_first_block": True, "cooldown_steps": 1,
                      "prune_any_sampler": False, "reuse_threshold": 0.0, "execution": "auto", "extrapolation": 0.5}
    assert not page.console_errors, page.console_errors


def test_stats_widget_shows_a_run(page, server, object_info, tiny_models, tmp_path):
    name = SD35_MEDIUM
    wf = _load(name)
    page.evaluate(LOAD_AND_INSPECT, wf)
    stats_id = _nodes_of(wf, "CATStats")[0]["id"]
    # record every state the Stats view goes through
    page.evaluate("""(id) => {
      const el = app.graph.getNodeById(id).widgets.find((w) => w.name === "cat_stats_view").element;
      window.__catStates = [el.dataset.state];
      new MutationObserver(() => window.__catStates.push(el.dataset.state + ":" + el.querySelector(".cat-state").textContent))
        .observe(el, {attributes: true, attributeFilter: ["data-state"], subtree: true, childList: true, characterData: true});
    }""", stats_id)
    client_id = page.evaluate("() => window.comfyAPI.api.api.clientId")
    server.client_id = client_id  # the server sends this run's messages to the page
    entry = server.run(_api_for(name, object_info, tiny_models), timeout=240)
    assert entry["status"]["status_str"] == "success"
    page.wait_for_function("""(id) => {
      const el = app.graph.getNodeById(id).widgets.find((w) => w.name === "cat_stats_view").element;
      return el.dataset.state === "done" && el.dataset.psnr !== "";
    }""", arg=stats_id, timeout=30_000)
    got = page.evaluate("""(id) => {
      const el = app.graph.getNodeById(id).widgets.find((w) => w.name === "cat_stats_view").element;
      const canvas = el.querySelector("canvas");
      const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      let painted = 0, yellow = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (px[i + 3] > 0) painted++;
        if (px[i] > 200 && px[i + 1] > 150 && px[i + 2] < 90 && px[i + 3] > 200) yellow++;  // pruned bars
      }
      const cells = [...el.querySelectorAll(".cat-num b")].map((b) => b.textContent);
      return {states: window.__catStates, steps: +el.dataset.steps, bars: +canvas.dataset.bars, painted, yellow,
              cells, psnr: el.dataset.psnr, status: el.querySelector(".cat-state").textContent,
              report: el.querySelector("pre").textContent};
    }""", stats_id)
    assert any(s.startswith("running") for s in got["states"]), got["states"]
    assert got["steps"] == 6 and got["bars"] == 6 and got["painted"] > 500 and got["yellow"] > 50, got
    assert got["cells"][0].endswith("%") and got["cells"][1].startswith("≈") and got["cells"][2].endswith("dB"), got["cells"]
    assert float(got["psnr"]) > 0 and "MACs saved" in got["report"] and got["status"].startswith("Last run"), got
    # the preview nodes received the Stats images
    for out in _nodes_of(wf, "CATStats")[0]["outputs"][1:]:
        target = next(link[3] for link in wf["links"] if link[0] == out["links"][0])
        assert page.evaluate("(id) => (app.nodeOutputs?.[String(id)]?.images?.length ?? 0)", target) > 0, out["name"]
    assert not page.console_errors, page.console_errors

    page.screenshot(path=str(tmp_path / "workflow_after_run.png"))
    preview_ids = [stats_id] + [link[3] for link in wf["links"] if link[1] == stats_id]
    clip = _focus(page, preview_ids)
    page.wait_for_timeout(800)  # previews load from /view
    shot = tmp_path / "ui_stats.png"
    page.screenshot(path=str(shot), clip=clip)
    compare_id = _nodes_of(wf, "CATCompare")[0]["id"]
    diff_id = next(link[3] for link in wf["links"] if link[1] == compare_id and link[2] == 1)
    clip = _focus(page, [compare_id, diff_id])
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "ui_compare.png"), clip=clip)
    BENCH_OUT.mkdir(exist_ok=True)
    shutil.copyfile(shot, BENCH_OUT / "ui_stats.png")


# ------------------------------------------------------------------------------------ template browser
#: a laptop-sized window: the template browser fits the graph into it, and below the frontend's
#: level-of-detail zoom every node draws as a blank box
TEMPLATE_VIEWPORT = {"width": 1600, "height": 900}
TEMPLATE_SHOTS = BENCH_OUT / "templates"

OPEN_FROM_TEMPLATE_BROWSER = """async ([pack, name]) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (what, ms = 15000) => { for (let t = 0; t < ms; t += 100) { const v = what(); if (v) return v; await sleep(100); } return null; };
  await app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const dialog = await until(() => document.querySelector('[role="dialog"]'));
  const category = await until(() => [...dialog.querySelectorAll("*")].find((e) => e.children.length === 0 && e.textContent.trim() === pack));
  if (!category) return {error: `no template category ${pack}`};
  (category.closest("button, a, li, [role='button']") ?? category).click();
  const card = await until(() => dialog.querySelector(`[data-testid="template-workflow-${CSS.escape(name)}"]`));
  if (!card) return {error: `no card for ${name}`};
  const shown = () => { const i = card.querySelector("img"); return i?.complete && i.naturalWidth > 0 && !i.src.endsWith("default-template.png") && i; };
  const img = (await until(shown, 5000)) ?? card.querySelector("img");
  const thumbnail = img ? {src: decodeURIComponent(img.src), loaded: img.complete && img.naturalWidth > 0} : null;
  const cardText = card.innerText;
  card.click();
  await until(() => !document.querySelector('[role="dialog"]') && document.title.includes(name), 15000);
  await sleep(800);
  const canvas = app.canvas, th = LiteGraph.NODE_TITLE_HEIGHT;
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const box = (n) => [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th];
  const area = (a, b) => Math.max(0, Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0])) *
                         Math.max(0, Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]));
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++)
    if (area(box(nodes[i]), box(nodes[j])) > 0) overlaps.push(`${nodes[i].title} / ${nodes[j].title}`);
  const groups = app.graph.groups ?? app.graph._groups ?? [];
  const coveredGroupTitles = groups.filter((g) => {
    const b = g._bounding ?? g.bounding, bar = [b[0], b[1], b[2], (g.font_size ?? 24) * 1.4];
    return nodes.some((n) => area(bar, box(n)) > 0);
  }).map((g) => g.title);
  const rect = canvas.canvas.getBoundingClientRect();
  const onScreen = ([x, y]) => { const [cx, cy] = canvas.ds.convertOffsetToCanvas([x, y]); return [rect.left + cx, rect.top + cy]; };
  const hidden = [];
  for (const n of nodes.filter((n) => n.type.startsWith("CAT"))) {
    for (const w of n.widgets ?? []) {
      if (w.hidden) { hidden.push(`${n.type}.${w.name}: hidden`); continue; }
      const y = w.last_y ?? w.y, h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
      if (y == null || y + h > n.size[1] + 0.5) { hidden.push(`${n.type}.${w.name}: below the node (y ${y} + ${h} > ${n.size[1]})`); continue; }
      for (const fx of [0.1, 0.5, 0.9]) {  // left, middle and right of the widget row
        const [px, py] = onScreen([n.pos[0] + fx * n.size[0], n.pos[1] + y + h / 2]);
        const hit = document.elementFromPoint(px, py);
        const ok = hit === canvas.canvas || (w.element && w.element.contains(hit));
        if (!ok) { hidden.push(`${n.type}.${w.name}: covered at (${px.toFixed(0)}, ${py.toFixed(0)}) by ${hit?.tagName}.${hit?.className}`); break; }
      }
    }
  }
  return {scale: canvas.ds.scale, lowQuality: canvas.low_quality, threshold: canvas._lowQualityZoomThreshold,
          thumbnail, cardText, overlaps, coveredGroupTitles, hidden, tab: document.title};
}"""


def _write_thumbnail(page, path: Path) -> None:
    """The card's thumbnail: the graph as the template browser shows it, minimap hidden, 4:3 JPEG."""
    from PIL import Image

    clip = page.evaluate("""async () => {
      await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
      const nodes = app.graph.nodes ?? app.graph._nodes, groups = app.graph.groups ?? app.graph._groups ?? [];
      const boxes = [...nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]),
                     ...groups.map((g) => [...(g._bounding ?? g.bounding)])];
      const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
      const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
      app.canvas.setDirty(true, true); app.canvas.draw(true, true);
      await new Promise((r) => setTimeout(r, 300));
      const r = app.canvas.canvas.getBoundingClientRect();
      const [ax, ay] = app.canvas.ds.convertOffsetToCanvas([x0, y0]), [bx, by] = app.canvas.ds.convertOffsetToCanvas([x1, y1]);
      return {x: r.left + ax - 8, y: r.top + ay - 8, width: bx - ax + 16, height: by - ay + 16};
    }""")
    png = path.with_suffix(".thumbnail.png")
    page.screenshot(path=str(png), clip=clip)
    page.evaluate('() => app.extensionManager.setting.set("Comfy.Minimap.Visible", true)')
    with Image.open(png) as shot:
        shot = shot.convert("RGB")
        width = max(shot.width, shot.height * 4 // 3)
        canvas = Image.new("RGB", (width, width * 3 // 4), shot.getpixel((2, 2)))
        canvas.paste(shot, ((width - shot.width) // 2, (canvas.height - shot.height) // 2))
        canvas.resize((800, 600), Image.LANCZOS).save(path, "JPEG", quality=85, optimize=True)
    png.unlink()


@pytest.mark.parametrize("name", SHIPPED)
def test_template_browser_opens_workflow_legibly(page, name):
    """Opened from the template browser (fit view) at a laptop's window size, a shipped workflow
    draws at full detail, no two nodes overlap, no group title is covered, every widget of the CAT
    nodes can be seen and reached, and the card shows the workflow's own thumbnail."""
    stem = Path(name).stem
    before = page.viewport_size
    page.set_viewport_size(TEMPLATE_VIEWPORT)
    page.responses.clear()
    try:
        got = page.evaluate(OPEN_FROM_TEMPLATE_BROWSER, [PACK_TEMPLATES, stem])
        TEMPLATE_SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(TEMPLATE_SHOTS / f"{stem}.png"))
        if os.environ.get("CAT_UPDATE_THUMBNAILS") and "error" not in got:
            _write_thumbnail(page, WORKFLOWS_DIR / f"{stem}.jpg")
    finally:
        page.set_viewport_size(before)
    assert "error" not in got, got
    assert got["tab"].startswith(("*" + stem, stem)), got["tab"]
    assert stem in got["cardText"], got["cardText"]
    pack_files = [(status, url) for status, url in page.responses if f"/workflow_templates/{PACK_TEMPLATES}/" in url]
    thumbnail_url = f"/workflow_templates/{PACK_TEMPLATES}/{stem}.jpg"
    for _ in range(50):  # on a loaded machine the card's image request may still be in flight
        if any(url.endswith(thumbnail_url) for _, url in pack_files):
            break
        page.wait_for_timeout(100)
        pack_files = [(status, url) for status, url in page.responses if f"/workflow_templates/{PACK_TEMPLATES}/" in url]
    assert (200, thumbnail_url) in [(st, url[url.index("/workflow_templates/"):]) for st, url in pack_files], pack_files
    assert [r for r in pack_files if r[0] >= 400] == [], pack_files  # no 404 for the pack's files
    assert got["thumbnail"]["loaded"] and not got["thumbnail"]["src"].endswith("default-template.png"), got["thumbnail"]
    assert got["threshold"] and got["scale"] >= got["threshold"] and got["lowQuality"] is False, got
    assert got["overlaps"] == [], got["overlaps"]
    assert got["coveredGroupTitles"] == [], got["coveredGroupTitles"]
    assert got["hidden"] == [], got["hidden"]
    assert not page.console_errors, page.console_errors


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_has_a_thumbnail_and_names_its_model_files(name):
    """The card's thumbnail lies beside the workflow; the note names every model file with its
    folder, and each loader carries the download entry the frontend's missing-models dialog shows."""
    stem = Path(name).stem
    thumbnail = WORKFLOWS_DIR / f"{stem}.jpg"
    assert thumbnail.is_file(), f"{thumbnail.name} is missing (CAT_UPDATE_THUMBNAILS=1 writes it from the browser test)"
    from PIL import Image

    with Image.open(thumbnail) as im:
        assert im.format == "JPEG" and min(im.size) >= 200
    wf = _load(name)
    note = "\n".join(n["widgets_values"][0] for n in _nodes_of(wf, "MarkdownNote"))
    loaders = [n for n in wf["nodes"] if n["type"] in LOADER_TYPES]
    files = [v for n in loaders for v in n["widgets_values"] if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)]
    assert files
    for n in loaders:
        entries = {m["name"]: m for m in n.get("properties", {}).get("models", [])}
        for f in (v for v in n["widgets_values"] if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)):
            assert f in entries and entries[f]["url"].endswith(f), (n["type"], f)
            assert f"ComfyUI/models/{entries[f]['directory']}/{f}" in note, (f, entries[f]["directory"])
    assert "keep_ratio" in note and "steps" in note


def test_every_cat_input_and_output_has_a_tooltip_without_measured_figures(object_info):
    """Tooltips explain; measured figures live in the README, where they are kept true."""
    import re

    measured = re.compile(r"\d\s*(%|dB\b|x\b)|\babout \d")
    for type_ in CAT_TYPES:
        info = object_info[type_]
        tips = info.get("output_tooltips") or []
        assert len(tips) == len(info["output"]) and all(tips), (type_, tips)
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        input_tips = [spec[1].get("tooltip") for spec in inputs.values() if len(spec) > 1]
        assert len(input_tips) == len(inputs) and all(input_tips), (type_, input_tips)
        for tip in [*tips, *input_tips, info.get("description", "")]:
            assert not measured.search(tip), (type_, tip)


def test_stats_widget_says_why_a_run_was_not_pruned(page, server, object_info, tiny_models):
    """With a sampler CAT leaves unpruned, the panel's status line says so instead of a plain 0%."""
    wf = _load(SD35_MEDIUM)
    page.evaluate(LOAD_AND_INSPECT, wf)
    stats_id = _nodes_of(wf, "CATStats")[0]["id"]
    api = _api_for(SD35_MEDIUM, object_info, tiny_models)
    for node in api.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["sampler_name"] = "deis"  # unpruned (uni_pc and others reuse steps instead)
    server.client_id = page.evaluate("() => window.comfyAPI.api.api.clientId")
    entry = server.run(api, timeout=240)
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"][str(stats_id)]["cat_stats"][0]["pruned_calls"] == 0
    status = page.wait_for_function("""(id) => {
      const el = app.graph.getNodeById(id).widgets.find((w) => w.name === "cat_stats_view").element;
      const text = el.querySelector(".cat-state").textContent;
      return el.dataset.state === "done" && text.startsWith("Not pruned") && text;
    }""", arg=stats_id, timeout=30_000).json_value()
    assert "deis" in status and "prune_any_sampler" in status, status
    assert not page.console_errors, page.console_errors
