"""CAT Pruning for ComfyUI: cluster-aware token pruning with caching (arXiv 2502.00433) for SD3 / SD3.5 / Flux / Flux.2 / Chroma.

ComfyUI loads this folder as a custom node pack and calls `comfy_entrypoint` (V3 nodes).
"""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI; plain `import cat_core` works without it
    from .nodes.extension import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
