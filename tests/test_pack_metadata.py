"""What the Registry and ComfyUI-Manager show: true names, a real icon, the workflows shipped."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_registry_icon_is_a_file_of_the_pack():
    from PIL import Image

    icon_url = PYPROJECT["tool"]["comfy"]["Icon"]
    relative = icon_url.split("/main/", 1)[1]
    with Image.open(REPO / relative) as icon:
        assert icon.format == "PNG" and icon.size[0] == icon.size[1] >= 256


def test_names_and_description_cover_every_supported_family():
    text = PYPROJECT["project"]["description"] + " " + PYPROJECT["tool"]["comfy"]["DisplayName"]
    for family in ("SD3", "SD3.5", "Flux", "Chroma"):
        assert family in text, family
    assert PYPROJECT["project"]["version"] in (REPO / "README.md").read_text(encoding="utf-8")


def test_workflows_are_shipped_with_their_thumbnails():
    assert "workflows" in PYPROJECT["tool"]["comfy"]["includes"]
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert workflows
    for wf in workflows:
        json.loads(wf.read_text(encoding="utf-8"))
        assert wf.with_suffix(".jpg").is_file(), f"{wf.name} has no thumbnail beside it"
