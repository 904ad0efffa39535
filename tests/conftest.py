"""Shared pytest configuration for the CAT Pruning node pack.

Two tiers:

* host-free tier -- everything outside ``tests/host/``. Runs with a plain
  ``python -m pytest -q`` and must never import ComfyUI (``comfy``,
  ``comfy_api``, ``folder_paths``, ...).
* host tier -- tests under ``tests/host/`` or marked ``@pytest.mark.host``.
  They run only when the environment variable ``COMFYUI_PATH`` points at a
  ComfyUI checkout; otherwise they are skipped with ``HOST_SKIP_REASON``.

Nothing in this file imports ComfyUI at import/collection time: the
``comfy`` session fixture does the import dance lazily (see
``tests/host/comfy_env.py``).

Layout notes:

* ``tests/`` deliberately has no ``__init__.py``.  The repo root is the node
  pack and has one, so with ``tests/__init__.py`` pytest would name test
  modules ``<checkout dir>.tests.test_x`` and import the pack as a package
  first.  ``tests`` is bound to this directory below instead.
* pytest (>= 8) still imports the repo-root ``__init__.py`` once, when it
  sets up the rootdir "Package" before the first test (as module
  ``<checkout dir>``, or ``__init__`` when the dir name is not an
  identifier).  The pack's ``__init__.py`` must therefore stay import-safe
  without ComfyUI (it only loads its nodes when ``comfy_api`` is findable).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
HOST_DIR = TESTS_DIR / "host"

HOST_SKIP_REASON = (
    "COMFYUI_PATH not set: host-tier tests need a ComfyUI checkout "
    "(see README, 'Running the tests')"
)


# --------------------------------------------------------------------------
# import paths
# --------------------------------------------------------------------------
def _ensure_repo_root_on_path() -> None:
    """Make ``import cat_core`` and ``from tests.fixtures import ...`` work.

    The ``comfy`` fixture later puts ``COMFYUI_PATH`` at ``sys.path[0]``,
    ahead of the repo root: the pack has a top-level ``nodes/`` package that
    must not shadow ComfyUI's own ``nodes.py`` for ComfyUI's imports.
    """
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def _pin_tests_package() -> None:
    """Bind the name ``tests`` to *this* directory.

    ComfyUI ships a regular ``tests`` package at its root; once
    ``COMFYUI_PATH`` is on ``sys.path`` a plain ``import tests`` could resolve
    to it.  Registering our package explicitly removes the ambiguity, whether
    or not ``tests/__init__.py`` exists.
    """
    existing = sys.modules.get("tests")
    if existing is not None:
        paths = [Path(p).resolve() for p in getattr(existing, "__path__", [])]
        if TESTS_DIR in paths:
            return
    init = TESTS_DIR / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(
            "tests", init, submodule_search_locations=[str(TESTS_DIR)]
        )
    else:  # namespace-style package rooted here only
        spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
        spec.submodule_search_locations = [str(TESTS_DIR)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)


_ensure_repo_root_on_path()
_pin_tests_package()

# Fixtures from the host helpers (import nothing from ComfyUI at import time).
from tests.host.server import comfy_server_factory  # noqa: E402,F401


# --------------------------------------------------------------------------
# host-tier detection
# --------------------------------------------------------------------------
def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when unset."""
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        return None
    return Path(raw).expanduser().resolve()


def _comfyui_version(path: Path) -> str:
    """Read ``comfyui_version.py`` as text (never imports ComfyUI)."""
    vfile = path / "comfyui_version.py"
    try:
        for line in vfile.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        pass
    return "unknown version"


def _is_host_item(item: pytest.Item) -> bool:
    if item.get_closest_marker("host") is not None:
        return True
    try:
        Path(str(item.path)).resolve().relative_to(HOST_DIR)
        return True
    except ValueError:
        return False


def pytest_report_header(config):  # noqa: D401 - pytest hook
    path = comfyui_path()
    if path is None:
        return "CAT host tier: OFF (COMFYUI_PATH not set; tests/host and @host tests are skipped)"
    if not (path / "comfy").is_dir():
        return f"CAT host tier: BROKEN (COMFYUI_PATH={path} has no comfy/ package)"
    return f"CAT host tier: ON (ComfyUI {_comfyui_version(path)} at {path})"


def pytest_collection_modifyitems(config, items):
    path = comfyui_path()
    skip_host = pytest.mark.skip(reason=HOST_SKIP_REASON)
    markexpr = getattr(config.option, "markexpr", "") or ""
    kept, deselected = [], []
    for item in items:
        if item.get_closest_marker("bench") is not None and "bench" not in markexpr:
            deselected.append(item)
            continue
        if _is_host_item(item):
            if item.get_closest_marker("host") is None:
                item.add_marker(pytest.mark.host)
            if path is None:
                item.add_marker(skip_host)
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    """Path of the ComfyUI checkout (skips when COMFYUI_PATH is unset)."""
    path = comfyui_path()
    if path is None:
        pytest.skip(HOST_SKIP_REASON)
    if not (path / "comfy").is_dir():
        pytest.fail(f"COMFYUI_PATH={path} does not look like a ComfyUI checkout (no comfy/ package)")
    return path


@pytest.fixture(scope="session")
def comfy(comfyui_root):
    """Import ComfyUI in-process and return a namespace of its modules.

    Puts ``COMFYUI_PATH`` at ``sys.path[0]`` and sets
    ``comfy.cli_args.args.cpu = True`` before the first other comfy import
    when no CUDA device is available (``comfy.model_management`` queries the
    device at import time).  Attributes: ``path``, ``version``, ``cli_args``,
    ``args``, ``model_management``, ``sd``, ``sample``, ``samplers``,
    ``model_base``, ``model_patcher``, ``ops``, ``patcher_extension``,
    ``mmdit``, ``utils``.
    """
    from tests.host import comfy_env

    return comfy_env.import_comfy(comfyui_root)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every test module runs torch on one intra-op thread: on the shared 2-core machines the tiny
    models here run much faster that way than with torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
