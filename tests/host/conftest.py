"""Fixtures shared by the host-tier test modules."""
from __future__ import annotations

import pytest

from tests.host import comfy_env as ce


@pytest.fixture(scope="module")
def pack(comfy):
    """The node pack imported the way ComfyUI imports a custom-node folder."""
    return ce.import_pack()


@pytest.fixture
def forced_lowvram(comfy, monkeypatch):
    """Make ComfyUI load models in lowvram mode on this CPU machine.

    On a CPU device load_models_gpu always loads fully (vram state DISABLED for cpu load devices),
    and the offload device is the CPU too. Forcing the weight budget that load_models_gpu hands to
    LoadedModel.model_load reproduces what a small GPU gets: modules beyond the budget keep their
    weights "offloaded" and are cast per forward (comfy_cast_weights), LoRA patches become
    LowVramPatch weight functions applied on the fly. What this cannot exercise on CPU is a real
    device transfer.
    """
    mm = comfy.model_management
    original = mm.LoadedModel.model_load
    budget = {"bytes": 1}

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return original(self, budget["bytes"], force_patch_weights=force_patch_weights)

    mm.unload_all_models()
    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)
    yield budget
    monkeypatch.setattr(mm.LoadedModel, "model_load", original)
    mm.unload_all_models()
