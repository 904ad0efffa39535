"""Fixtures shared by the host-tier test modules."""
from __future__ import annotations

import pytest

from tests.host import comfy_env as ce


@pytest.fixture(scope="module")
def pack(comfy):
    """The node pack imported the way ComfyUI imports a custom-node folder."""
    return ce.import_pack()
