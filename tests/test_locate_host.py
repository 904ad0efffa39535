"""Finding the ComfyUI host: COMFYUI_PATH first, else the ComfyUI tree the pack is cloned into."""
from __future__ import annotations

import pytest

from tests.host.locate import REQUIRE_EVERY_TIER, find_comfyui, skip_for_missing


def _comfy_tree(root):
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    pack = root / "custom_nodes" / "ComfyUI-CAT-Pruning"
    pack.mkdir(parents=True)
    return pack


def test_pack_inside_custom_nodes_finds_its_comfyui(tmp_path):
    pack = _comfy_tree(tmp_path / "ComfyUI")
    found = find_comfyui(pack, environ={})
    assert found.path == (tmp_path / "ComfyUI").resolve()
    assert "cloned into" in found.how


def test_comfyui_path_overrides_the_tree_around_the_pack(tmp_path):
    pack = _comfy_tree(tmp_path / "ComfyUI")
    other = tmp_path / "other"
    found = find_comfyui(pack, environ={"COMFYUI_PATH": f"  {other}  "})
    assert found.path == other.resolve() and "COMFYUI_PATH" in found.how


@pytest.mark.parametrize("broken", ["no_main", "no_comfy", "not_custom_nodes"])
def test_no_host_without_a_real_comfyui_tree_around_the_pack(tmp_path, broken):
    root = tmp_path / "ComfyUI"
    pack = _comfy_tree(root)
    if broken == "no_main":
        (root / "main.py").unlink()
    elif broken == "no_comfy":
        (root / "comfy").rmdir()
    else:
        pack = root / "elsewhere" / "pack"
        pack.mkdir(parents=True)
    found = find_comfyui(pack, environ={"COMFYUI_PATH": ""})
    assert found.path is None
    assert "COMFYUI_PATH is not set" in found.how


def test_missing_prerequisite_skips_or_fails_when_every_tier_is_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_EVERY_TIER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        skip_for_missing("no chromium")
    monkeypatch.setenv(REQUIRE_EVERY_TIER, "1")
    with pytest.raises(pytest.fail.Exception, match="no chromium.*every tier must run"):
        skip_for_missing("no chromium")
