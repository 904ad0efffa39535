"""Fixtures shared by the host-tier test modules."""
from __future__ import annotations

import pytest
import torch

from tests.host import comfy_env as ce


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two shared cores: torch's default of 2 intra-op threads makes these tiny models ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pack(comfy):
    """The node pack imported the way ComfyUI imports a custom-node folder."""
    return ce.import_pack()
