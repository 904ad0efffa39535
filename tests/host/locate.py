"""Where the ComfyUI host is: ``COMFYUI_PATH``, else the ComfyUI tree the pack is cloned into.

Imports nothing from ComfyUI, so the host-free tier, conftest and the bench scripts can ask.
A user who clones the pack into ``ComfyUI/custom_nodes/`` runs the host tier with a plain
``python -m pytest -q``; ``COMFYUI_PATH`` still wins when set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class HostLocation:
    path: Path | None
    #: how it was found, or why not: shown in pytest's header and in skip reasons
    how: str


def is_comfyui_tree(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def find_comfyui(pack_root: Path = PACK_ROOT, environ: dict | None = None) -> HostLocation:
    env = os.environ if environ is None else environ
    raw = env.get("COMFYUI_PATH", "").strip()
    if raw:
        path = Path(raw).expanduser().resolve()
        return HostLocation(path, f"COMFYUI_PATH={path}")
    parent = pack_root.parent
    if parent.name == "custom_nodes" and is_comfyui_tree(parent.parent):
        path = parent.parent.resolve()
        return HostLocation(path, f"the ComfyUI tree this pack is cloned into ({path})")
    return HostLocation(None, "COMFYUI_PATH is not set and the pack is not inside a ComfyUI tree's custom_nodes/")


def comfyui_path_or_raise() -> Path:
    found = find_comfyui()
    if found.path is None:
        raise RuntimeError(f"no ComfyUI found: {found.how} (see README, 'Running the tests')")
    return found.path


#: set by .ci/run where a ComfyUI is present: a missing host, package or program fails the run
REQUIRE_EVERY_TIER = "CAT_REQUIRE_EVERY_TIER"


def skip_for_missing(reason: str):
    """Skip a test whose prerequisite is missing, or fail it where every tier is required."""
    import pytest

    if os.environ.get(REQUIRE_EVERY_TIER):
        pytest.fail(f"{reason} ({REQUIRE_EVERY_TIER} is set: every tier must run)", pytrace=False)
    pytest.skip(reason)


if __name__ == "__main__":  # for shell scripts: prints the path, or nothing and exit 1
    found = find_comfyui()
    if found.path is None:
        raise SystemExit(1)
    print(found.path)
