"""Test-only ComfyUI node pack (V3) for the CAT Pruning host tests.

Symlinked into ``<base>/custom_nodes/cat_fixture_nodes`` by
``tests/host/server.py``; never shipped to users.  Node ids start with
``CATFixture``:

* ``CATFixtureRandomCond`` -- INT seed, INT batch -> SD3 CONDITIONING with
  seeded random context ``[batch, tokens, context_dim]`` and pooled
  ``[batch, adm]`` (defaults 16 / 64 / 64, i.e. ``[1, 16, 64]`` / ``[1, 64]``
  for batch 1).  Needs nothing but torch.
* ``CATFixtureTextEncode`` -- STRING prompt -> CONDITIONING through
  ``tests/fixtures/tiny_t2i.py``'s ``encode_prompts([text]) -> (context
  [1, 16, 64], pooled [1, 64])``.
* ``CATFixtureDecode`` -- LATENT -> IMAGE through ``tiny_t2i.latent_to_rgb(
  latent [B, 16, h, w]) -> [B, 8h, 8w, 3]`` in [0, 1].
* ``CATFixtureLatentRGB`` -- LATENT -> IMAGE without any fixture model
  (first three channels, squashed to [0, 1], nearest-upscaled x8), so server
  smoke tests can end in an IMAGE before tiny_t2i exists.  5-D video-style
  latents ``[B, C, T, h, w]`` (Qwen-Image's one-frame latents) give one
  image per frame.
* ``CATFixtureTinyQwen`` -- INT seed, INT depth -> MODEL: a tiny random
  Qwen-Image built by ``tests/host/comfy_env_qwen.py`` (ComfyUI's detection of
  a Qwen-Image file keeps the real model's widths, so a tiny file in
  UNETLoader cannot load).
* ``CATFixtureTinyPixArt`` -- INT seed, INT depth -> MODEL: a tiny random
  PixArt-Σ built by ``tests/host/comfy_env_pixart.py`` (detection fixes
  PixArt's real widths too); its text width is ``comfy_env_pixart.CAPTION``.

``tiny_t2i.py`` is loaded by file path relative to this file (after
resolving the custom_nodes symlink), as a standalone module: it must only
import torch/numpy/stdlib and find its data relative to its own ``__file__``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from comfy_api.latest import ComfyExtension, io

_HERE = Path(__file__).resolve().parent  # resolves the custom_nodes symlink
TINY_T2I_PATH = _HERE.parents[2] / "fixtures" / "tiny_t2i.py"  # tests/fixtures/tiny_t2i.py
_MODULE_NAME = "cat_fixture_nodes_tiny_t2i"


def load_tiny_t2i():
    """Import tests/fixtures/tiny_t2i.py (cached); FileNotFoundError if absent."""
    mod = sys.modules.get(_MODULE_NAME)
    if mod is not None:
        return mod
    if not TINY_T2I_PATH.is_file():
        raise FileNotFoundError(f"{TINY_T2I_PATH} does not exist (the tiny text-to-image fixture is not written yet)")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, TINY_T2I_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_MODULE_NAME, None)
        raise
    return mod


def import_repo_tests(module: str):
    """``tests.<module>`` of this repo (e.g. ``host.comfy_env_qwen``).

    The server runs from the ComfyUI checkout, whose own ``tests`` (a regular package) shadows
    the repo's namespace package ``tests``; the repo's is registered under that name first, as
    long as nothing imported ComfyUI's.
    """
    import importlib
    import types

    ours = str(_HERE.parents[2])  # tests/
    mod = sys.modules.get("tests")
    if mod is None:
        mod = types.ModuleType("tests")
        mod.__path__ = [ours]
        sys.modules["tests"] = mod
    elif ours not in [str(Path(p).resolve()) for p in getattr(mod, "__path__", [])]:
        raise RuntimeError(f"another 'tests' package is already imported ({mod!r}): cannot import the repo's tests.{module}")
    return importlib.import_module(f"tests.{module}")


def _sd3_conditioning(context: torch.Tensor, pooled: torch.Tensor) -> list:
    return [[context.float().cpu(), {"pooled_output": pooled.float().cpu()}]]


class CATFixtureRandomCond(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATFixtureRandomCond",
            display_name="CAT Fixture: Random SD3 Cond",
            category="testing/cat_fixture",
            description="Seeded random SD3 conditioning (context + pooled_output) for tiny test models.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF),
                io.Int.Input("batch", default=1, min=1, max=64),
                io.Int.Input("tokens", default=16, min=1, max=512, optional=True, advanced=True),
                io.Int.Input("context_dim", default=64, min=1, max=8192, optional=True, advanced=True),
                io.Int.Input("adm", default=64, min=1, max=8192, optional=True, advanced=True),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, batch: int, tokens: int = 16, context_dim: int = 64, adm: int = 64) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(int(seed))
        context = torch.randn((batch, tokens, context_dim), generator=gen)
        pooled = torch.randn((batch, adm), generator=gen)
        return io.NodeOutput(_sd3_conditioning(context, pooled))


class CATFixtureTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATFixtureTextEncode",
            display_name="CAT Fixture: Tiny Text Encode",
            category="testing/cat_fixture",
            description="Encode a prompt with the tiny text-to-image test fixture (tests/fixtures/tiny_t2i.py).",
            inputs=[io.String.Input("text", multiline=True, default="a red square")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text: str) -> io.NodeOutput:
        context, pooled = load_tiny_t2i().encode_prompts([text])
        return io.NodeOutput(_sd3_conditioning(torch.as_tensor(context), torch.as_tensor(pooled)))


class CATFixtureDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATFixtureDecode",
            display_name="CAT Fixture: Tiny Decode",
            category="testing/cat_fixture",
            description="Decode an SD3 latent with the tiny text-to-image test fixture (tests/fixtures/tiny_t2i.py).",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        latent = samples["samples"]
        image = torch.as_tensor(load_tiny_t2i().latent_to_rgb(latent.float().cpu()))
        return io.NodeOutput(image.float().clamp(0.0, 1.0).cpu())


class CATFixtureLatentRGB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATFixtureLatentRGB",
            display_name="CAT Fixture: Latent to RGB (no model)",
            category="testing/cat_fixture",
            description="Model-free latent preview: channels 0-2, sigmoid, nearest upscale x8.",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        latent = samples["samples"].float().cpu()
        if latent.ndim == 5:  # [B, C, T, h, w]: one image per frame, as a video VAE decodes
            latent = latent.movedim(2, 1).flatten(0, 1)
        rgb = torch.sigmoid(latent[:, :3])
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
        return io.NodeOutput(rgb.movedim(1, -1).contiguous())


def _tiny_model_schema(node_id: str, family: str, builders: str) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=f"CAT Fixture: Tiny {family}",
        category="testing/cat_fixture",
        description=f"A tiny seeded random {family} model (tests/host/{builders}.py), built through ComfyUI's detection.",
        inputs=[
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF),
            io.Int.Input("depth", default=2, min=1, max=16),
        ],
        outputs=[io.Model.Output()],
    )


def _builders(module: str):
    """The repo's tiny-model builders, bound to the server's own ComfyUI (not a search)."""
    import comfy.model_management

    import_repo_tests("host.comfy_env").import_comfy(Path(comfy.model_management.__file__).resolve().parents[1])
    return import_repo_tests(f"host.{module}")


class CATFixtureTinyQwen(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _tiny_model_schema("CATFixtureTinyQwen", "Qwen-Image", "comfy_env_qwen")

    @classmethod
    def execute(cls, seed: int, depth: int) -> io.NodeOutput:
        return io.NodeOutput(_builders("comfy_env_qwen").tiny_qwen(int(seed), depth=int(depth)))


class CATFixtureTinyPixArt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _tiny_model_schema("CATFixtureTinyPixArt", "PixArt-Sigma", "comfy_env_pixart")

    @classmethod
    def execute(cls, seed: int, depth: int) -> io.NodeOutput:
        return io.NodeOutput(_builders("comfy_env_pixart").tiny_pixart("sigma", int(seed), depth=int(depth)))


class CATFixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CATFixtureRandomCond, CATFixtureTextEncode, CATFixtureDecode, CATFixtureLatentRGB, CATFixtureTinyQwen,
                CATFixtureTinyPixArt]


async def comfy_entrypoint() -> CATFixtureExtension:
    return CATFixtureExtension()
