"""Shared pytest configuration for the CAT Pruning node pack.

Two tiers:

* host-free tier -- everything outside ``tests/host/``. Runs with a plain
  ``python -m pytest -q`` and must never import ComfyUI (``comfy``,
  ``comfy_api``, ``folder_paths``, ...).
* host tier -- tests under ``tests/host/`` or marked ``@pytest.mark.host``.
  They run when ``COMFYUI_PATH`` points at a ComfyUI checkout, or when the
  pack sits in a ComfyUI tree's ``custom_nodes/``; otherwise they are skipped
  with the reason (``host_skip_reason``). Browser tests (marker ``browser``)
  are the host tests that use the ``page`` fixture.
* ``CAT_REQUIRE_EVERY_TIER=1`` (set by ``.ci/run`` when it has a ComfyUI)
  turns a skip for a missing host, package or program into a failure.

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

# --------------------------------------------------------------------------
# import paths
# --------------------------------------------------------------------------
def _ensure_repo_root_on_path() -> None:
    """Make ``import cat_core`` and ``from tests.fixtures import ...`` work.

    The ``comfy`` fixture later puts the ComfyUI checkout at ``sys.path[0]``,
    ahead of the repo root: the pack has a top-level ``nodes/`` package that
    must not shadow ComfyUI's own ``nodes.py`` for ComfyUI's imports.
    """
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def _pin_tests_package() -> None:
    """Bind the name ``tests`` to *this* directory.

    ComfyUI ships a regular ``tests`` package at its root; once
    the checkout is on ``sys.path`` a plain ``import tests`` could resolve
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
from tests.host.locate import REQUIRE_EVERY_TIER, find_comfyui, skip_for_missing  # noqa: E402
from tests.host.server import comfy_server_factory  # noqa: E402,F401


# --------------------------------------------------------------------------
# host-tier detection
# --------------------------------------------------------------------------
def comfyui_path() -> Path | None:
    """``COMFYUI_PATH``, else the ComfyUI tree the pack sits in (``tests/host/locate.py``)."""
    return find_comfyui().path


def host_skip_reason() -> str:
    return f"host tier off: {find_comfyui().how} (see README, 'Running the tests')"


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


def _is_browser_item(item: pytest.Item) -> bool:
    return item.get_closest_marker("browser") is not None or "page" in getattr(item, "fixturenames", ())


def pytest_report_header(config):  # noqa: D401 - pytest hook
    found = find_comfyui()
    if found.path is None:
        return f"CAT host tier: OFF ({found.how}; tests/host and @host tests are skipped)"
    if not (found.path / "comfy").is_dir():
        return f"CAT host tier: BROKEN ({found.how} has no comfy/ package)"
    return f"CAT host tier: ON (ComfyUI {_comfyui_version(found.path)}, from {found.how})"


def pytest_collection_modifyitems(config, items):
    path = comfyui_path()
    skip_host = pytest.mark.skip(reason=host_skip_reason())
    markexpr = getattr(config.option, "markexpr", "") or ""
    kept, deselected = [], []
    for item in items:
        if item.get_closest_marker("bench") is not None and "bench" not in markexpr:
            deselected.append(item)
            continue
        if _is_host_item(item):
            if item.get_closest_marker("host") is None:
                item.add_marker(pytest.mark.host)
            if _is_browser_item(item) and item.get_closest_marker("browser") is None:
                item.add_marker(pytest.mark.browser)
            if path is None:
                if os.environ.get(REQUIRE_EVERY_TIER):
                    item.add_marker(pytest.mark.usefixtures("comfyui_root"))
                else:
                    item.add_marker(skip_host)
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


# --------------------------------------------------------------------------
# per-tier counts (printed before pytest's own closing line)
# --------------------------------------------------------------------------
TIERS = ("host-free", "host", "browser")
_tier_of: dict[str, str] = {}
_tier_counts = {tier: {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0} for tier in TIERS}


def pytest_itemcollected(item):
    tier = "browser" if _is_host_item(item) and _is_browser_item(item) else "host" if _is_host_item(item) else "host-free"
    _tier_of[item.nodeid] = tier


def pytest_runtest_logreport(report):
    tier = _tier_of.get(report.nodeid)
    if tier is None:
        return
    _tier_counts[tier]["seconds"] += report.duration
    counted = report.when == "call" or (report.when == "setup" and not report.passed) or (
        report.when == "teardown" and report.failed)
    if counted:
        _tier_counts[tier][report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("-", "CAT tiers")
    for tier in TIERS:
        c = _tier_counts[tier]
        terminalreporter.write_line(
            f"CAT tier {tier}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped ({c['seconds']:.0f} s)")


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    """Path of the ComfyUI checkout (skips when none is found; fails instead under CAT_REQUIRE_EVERY_TIER)."""
    found = find_comfyui()
    if found.path is None:
        skip_for_missing(host_skip_reason())
    if not (found.path / "comfy").is_dir():
        pytest.fail(f"{found.how} does not look like a ComfyUI checkout (no comfy/ package)")
    return found.path


@pytest.fixture(scope="session")
def comfy(comfyui_root):
    """Import ComfyUI in-process and return a namespace of its modules.

    Puts the checkout at ``sys.path[0]`` and sets
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
