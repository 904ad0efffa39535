"""Convert a UI-format workflow (what ComfyUI's frontend saves) to the API format of POST /prompt.

Test helper, no ComfyUI import: the node definitions come from the server's ``GET /object_info``.

* Widget values: each node's ``widgets_values`` are matched, in order, to its widget inputs
  (``input_order`` required then optional; socket-only types such as MODEL take no value). A
  widget with a "control after generate" companion (INT ``seed`` / ``noise_seed`` unless the
  spec says otherwise, or any spec with ``control_after_generate``) is followed by that
  companion's value ("fixed", "randomize", ...), which is skipped; the frontend's rule.
* Links: a connected input (also a widget converted to an input) becomes ``[origin id, slot]``,
  followed through ``Reroute`` nodes and bypassed nodes (mode 4: the first input of the
  output's type is passed through).
* Pure UI nodes (``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode``, ...: anything not in
  object_info that the frontend handles itself) and muted nodes (mode 2) are dropped; any other
  unknown type raises ``MissingNodeError``.

``substitute_tiny`` then rewrites a converted SD3 graph for a tiny test model: the checkpoint
loader becomes ``UNETLoader``, ``CLIPTextEncode`` the ``CATFixtureTextEncode`` test node,
``VAEDecode`` ``CATFixtureDecode`` (or ``CATFixtureLatentRGB``), with a small size and few steps.
``substitute_tiny_unet`` does the same for a graph with separate model files (UNETLoader + text
encoder and VAE loaders): the UNETLoader becomes a given tiny-model node, ``CLIPTextEncode``
``CATFixtureRandomCond`` and the text encoder / VAE loaders are dropped; ``substitute_tiny_flux``
(a tiny Flux file), ``substitute_tiny_qwen`` (the ``CATFixtureTinyQwen`` node) and
``substitute_tiny_pixart`` (the ``CATFixtureTinyPixArt`` node) apply it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

#: node types the frontend implements itself (never sent to the server)
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "PrimitiveString", "Comment"})
#: input types that are sockets only (everything else with a widget constructor is a widget)
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
MODE_MUTED, MODE_BYPASS = 2, 4


class MissingNodeError(KeyError):
    """The workflow uses a node type the server does not know."""


class WorkflowError(ValueError):
    """The workflow is inconsistent (a dangling link, too few widget values, ...)."""


def _links_by_id(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int, int, int, str]]:
    """{link id: (origin id, origin slot, target id, target slot, type)} for list or dict links."""
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, Mapping):
            out[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]), int(link["target_id"]),
                                    int(link["target_slot"]), link.get("type"))
        else:
            lid, oid, oslot, tid, tslot, ltype = link[:6]
            out[int(lid)] = (int(oid), int(oslot), int(tid), int(tslot), ltype)
    return out


def input_kind(spec: Any) -> tuple[str, dict]:
    """(type name, options) of one object_info input spec; combos (a list of values) are "COMBO"."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return str(spec), {}
    type_, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(type_, (list, tuple)):
        return "COMBO", options
    return str(type_), options


def widget_inputs(info: Mapping[str, Any]) -> list[tuple[str, int]]:
    """[(widget input name, number of widgets_values it takes)] in the frontend's widget order."""
    spec = info.get("input", {})
    order = info.get("input_order") or {k: list(spec.get(k, {})) for k in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            if name not in spec.get(section, {}):
                continue
            type_, options = input_kind(spec[section][name])
            if type_ not in WIDGET_TYPES or options.get("forceInput"):
                continue
            control = options.get("control_after_generate")
            if control is None:
                control = type_ == "INT" and name in SEED_NAMES
            out.append((name, 2 if control else 1))
    return out


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """The API-format prompt {node id: {"class_type", "inputs", "_meta"}} of a UI-format workflow."""
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links_by_id(workflow)
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info and n["type"] not in UI_ONLY_TYPES})
    if missing:
        raise MissingNodeError(f"node types not known to the server: {missing}")

    def resolve(link_id: int, seen=()) -> list | None:
        """[origin id, slot] of a link, through Reroutes and bypassed nodes; None if it ends nowhere."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is not in the workflow's links")
        origin, slot, _, _, ltype = links[link_id]
        node = nodes.get(origin)
        if node is None:
            raise WorkflowError(f"link {link_id} starts at missing node {origin}")
        if origin in seen:
            raise WorkflowError(f"link cycle through node {origin}")
        if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASS:
            for inp in node.get("inputs", []) or []:
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") in (ltype, "*")):
                    return resolve(int(inp["link"]), (*seen, origin))
            return None
        if node.get("mode") == MODE_MUTED or node["type"] in UI_ONLY_TYPES:
            return None
        return [str(origin), slot]

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        class_type = node["type"]
        if class_type in UI_ONLY_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[class_type]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, Mapping):  # some nodes save {name: value}
            for name, _ in widget_inputs(info):
                if name in values:
                    inputs[name] = values[name]
        else:
            values = list(values or [])
            i = 0
            for name, width in widget_inputs(info):
                if i >= len(values):
                    if name in info.get("input", {}).get("optional", {}):
                        continue  # saved before this input existed: the frontend gives it its default
                    raise WorkflowError(f"node {nid} ({class_type}): no widget value for {name!r} in {values}")
                inputs[name] = values[i]
                i += width
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is None:
                continue
            source = resolve(int(inp["link"]))
            if source is not None:
                inputs[inp["name"]] = source
            elif inp.get("widget") is None:
                inputs.pop(inp["name"], None)
        prompt[str(nid)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": node.get("title") or class_type}}
    return prompt


def output_nodes(prompt: Mapping[str, dict], object_info: Mapping[str, Any]) -> list[str]:
    return [nid for nid, n in prompt.items() if object_info.get(n["class_type"], {}).get("output_node")]


# ----------------------------------------------------------------------------------- substitution
Substitution = Callable[[str, dict], "dict | None"]


def substitute(prompt: Mapping[str, dict], rule: Substitution) -> dict[str, dict]:
    """Apply ``rule(node id, node) -> replacement node | None (keep)`` to every node (a copy)."""
    out = {}
    for nid, node in prompt.items():
        node = copy.deepcopy(node)
        replaced = rule(nid, node)
        out[nid] = node if replaced is None else replaced
    return out


#: a prompt in the tiny text encoder's vocabulary (tests/fixtures/tiny_t2i.py) for non-empty prompts
FIXTURE_PROMPT = "a big red circle on the left and a small yellow square at the top-right on a blue background"


def substitute_tiny(prompt: Mapping[str, dict], unet_name: str, *, size: int = 128, steps: int = 6, warmup: int = 2,
                    decode: str = "CATFixtureDecode", text: str = FIXTURE_PROMPT) -> dict[str, dict]:
    """An SD3 graph rewritten for a tiny test model file in models/diffusion_models/.

    CheckpointLoaderSimple -> UNETLoader(unet_name) (its MODEL output keeps slot 0; CLIP / VAE
    users are replaced below), CLIPTextEncode -> CATFixtureTextEncode (non-empty prompts become
    `text`, which the fixture encoder understands; empty ones stay empty), VAEDecode -> `decode`
    (CATFixtureDecode or CATFixtureLatentRGB), latent size -> size x size, sampler steps ->
    `steps`, CAT warm-up -> `warmup`. Node ids are kept, so UI output lands on the same nodes.
    """
    def rule(nid, node):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            return {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}, "_meta": node.get("_meta", {})}
        if ct == "CLIPTextEncode":
            original = inputs.get("text", "")
            new_text = text if isinstance(original, str) and original.strip() else ""
            return {"class_type": "CATFixtureTextEncode", "inputs": {"text": new_text}, "_meta": node.get("_meta", {})}
        return _shrink_decode_and_sampling(node, decode, size, steps, warmup)

    out = substitute(prompt, rule)
    loaders = {nid for nid, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"}
    for nid, node in out.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in loaders and value[1] != 0:
                raise WorkflowError(f"node {nid} ({node['class_type']}) still uses output {value[1]} of the replaced checkpoint loader")
    return out


def _shrink_decode_and_sampling(node: dict, decode: str, size: int, steps: int, warmup: int) -> dict | None:
    """The rewrites both tiny-model substitutions share: the decoder node, latent size, sampler
    steps and CAT warm-up (edited in place; a replacement node is returned for VAEDecode)."""
    ct, inputs = node["class_type"], node["inputs"]
    if ct == "VAEDecode":
        return {"class_type": decode, "inputs": {"samples": inputs["samples"]}, "_meta": node.get("_meta", {})}
    if ct in ("EmptySD3LatentImage", "EmptyLatentImage"):
        inputs.update(width=size, height=size)
    elif ct in ("KSampler", "KSamplerAdvanced"):
        inputs["steps"] = steps
    elif ct == "CATPruningSettings":
        inputs["warmup_steps"] = warmup
    return None


#: loaders of real text encoders / VAEs that a tiny UNETLoader graph (Flux, Qwen-Image) does without
FLUX_DROPPED_LOADERS = frozenset({"DualCLIPLoader", "CLIPLoader", "TripleCLIPLoader", "VAELoader"})


def substitute_tiny_unet(prompt: Mapping[str, dict], model: Mapping[str, Any], *, size: int = 128, steps: int = 6,
                         warmup: int = 2, decode: str = "CATFixtureLatentRGB", context_dim: int = 64, vec_dim: int = 64,
                         tokens: int = 8) -> dict[str, dict]:
    """A graph with separate model files (UNETLoader, text encoder and VAE loaders) rewritten for a tiny model.

    Every UNETLoader becomes `model` ({"class_type", "inputs"}: a UNETLoader of a tiny file, or a
    fixture node that builds the model; its MODEL output keeps slot 0), CLIPTextEncode ->
    CATFixtureRandomCond (seeded random context [1, tokens, context_dim] and pooled [1, vec_dim],
    which must match the tiny model's text width; FluxGuidance, ConditioningZeroOut,
    ModelSampling* etc. work on the result unchanged), VAEDecode -> `decode`, the text encoder
    and VAE loaders are dropped (nothing may still use them), latent size -> size x size, sampler
    steps -> `steps`, CAT warm-up -> `warmup`. Node ids are kept.
    """
    def rule(nid, node):
        ct = node["class_type"]
        if ct == "UNETLoader":
            return {**copy.deepcopy(dict(model)), "_meta": node.get("_meta", {})}
        if ct == "CLIPTextEncode":
            return {"class_type": "CATFixtureRandomCond",
                    "inputs": {"seed": int(nid), "batch": 1, "tokens": tokens, "context_dim": context_dim, "adm": vec_dim},
                    "_meta": node.get("_meta", {})}
        return _shrink_decode_and_sampling(node, decode, size, steps, warmup)

    dropped = {nid for nid, n in prompt.items() if n["class_type"] in FLUX_DROPPED_LOADERS}
    out = {nid: node for nid, node in substitute(prompt, rule).items() if nid not in dropped}
    for nid, node in out.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in dropped:
                raise WorkflowError(f"node {nid} ({node['class_type']}) still uses the dropped loader {value[0]}")
    return out


def substitute_tiny_flux(prompt: Mapping[str, dict], unet_name: str, *, context_dim: int = 64, vec_dim: int = 64,
                         **kwargs) -> dict[str, dict]:
    """A Flux graph (UNETLoader, DualCLIPLoader, VAELoader) rewritten for a tiny Flux file in
    models/diffusion_models/ (``substitute_tiny_unet``; context_dim / vec_dim: the tiny model's
    context_in_dim / vec_in_dim)."""
    model = {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}
    return substitute_tiny_unet(prompt, model, context_dim=context_dim, vec_dim=vec_dim, **kwargs)


def substitute_tiny_qwen(prompt: Mapping[str, dict], *, seed: int = 7, depth: int = 2, context_dim: int = 48,
                         **kwargs) -> dict[str, dict]:
    """A Qwen-Image graph (UNETLoader, CLIPLoader, VAELoader) rewritten for a tiny Qwen-Image.

    ComfyUI's detection of a Qwen-Image file keeps the real model's widths, so the UNETLoader
    becomes CATFixtureTinyQwen (tests/host/comfy_env_qwen.py's builder, from `seed`);
    context_dim: its text width (comfy_env_qwen.TINY's joint_attention_dim). The decode gets
    the sampler's 5-D one-frame latent, which CATFixtureLatentRGB takes. See ``substitute_tiny_unet``.
    """
    model = {"class_type": "CATFixtureTinyQwen", "inputs": {"seed": seed, "depth": depth}}
    return substitute_tiny_unet(prompt, model, context_dim=context_dim, **kwargs)


def substitute_tiny_pixart(prompt: Mapping[str, dict], *, seed: int = 7, depth: int = 2, context_dim: int = 64,
                           **kwargs) -> dict[str, dict]:
    """A PixArt-Σ graph (UNETLoader, CLIPLoader, VAELoader, EmptyLatentImage) rewritten for a tiny PixArt-Σ.

    ComfyUI's detection of a PixArt file keeps the real model's widths, so the UNETLoader becomes
    CATFixtureTinyPixArt (tests/host/comfy_env_pixart.py's builder, from `seed`); context_dim:
    its caption width (comfy_env_pixart.CAPTION). PixArt reads only the context, not the pooled
    output; the decode gets the 4-channel SDXL-format latent. See ``substitute_tiny_unet``.
    """
    model = {"class_type": "CATFixtureTinyPixArt", "inputs": {"seed": seed, "depth": depth}}
    return substitute_tiny_unet(prompt, model, context_dim=context_dim, **kwargs)
