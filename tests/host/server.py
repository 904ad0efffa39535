"""A headless ComfyUI server for host-tier tests (loopback only).

``ComfyServer`` starts ``main.py`` from a ComfyUI checkout (cwd =
COMFYUI_PATH or the tree the pack is cloned into) in a throw-away base directory::

    python main.py --cpu --listen 127.0.0.1 --port <free>
        --base-directory <tmp> --front-end-root <empty dir>
        --disable-auto-launch --disable-api-nodes
        --database-url sqlite:///:memory:

``<tmp>/custom_nodes/`` holds symlinks to the node folders you pass
(``custom_nodes``); ``<tmp>/models/<kind>/`` holds symlinks to model files.
Nothing here imports ComfyUI in the test process.

Use it as a context manager (``with ComfyServer(...) as srv:``) or through
the ``comfy_server_factory`` fixture (stops every server at teardown).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest

HOST_DIR = Path(__file__).resolve().parent
TESTS_DIR = HOST_DIR.parent
REPO_ROOT = TESTS_DIR.parent

#: folder name of the pack under custom_nodes/ (as users install it)
PACK_FOLDER_NAME = "ComfyUI-CAT-Pruning"
#: the test-only V3 node pack
FIXTURE_NODES_DIR = HOST_DIR / "testing_nodes" / "cat_fixture_nodes"

LOOPBACK = "127.0.0.1"


class ComfyServerError(RuntimeError):
    """Server failed to start, a prompt was rejected, failed or timed out.

    The message ends with the tail of the server log.
    """


def default_custom_nodes(*, pack: bool = True, fixture_nodes: bool = True) -> dict[str, Path]:
    """``{folder name: source dir}`` for custom_nodes/.

    ``pack``: the repo root as ``ComfyUI-CAT-Pruning`` (needs a loadable
    ``__init__.py``); ``fixture_nodes``: ``tests/host/testing_nodes/cat_fixture_nodes``.
    """
    out: dict[str, Path] = {}
    if pack:
        out[PACK_FOLDER_NAME] = REPO_ROOT
    if fixture_nodes:
        out[FIXTURE_NODES_DIR.name] = FIXTURE_NODES_DIR
    return out


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _as_folder_map(custom_nodes) -> dict[str, Path]:
    if custom_nodes is None:
        return default_custom_nodes()
    if isinstance(custom_nodes, Mapping):
        return {str(k): Path(v) for k, v in custom_nodes.items()}
    return {Path(p).name: Path(p) for p in custom_nodes}


class ComfyServer:
    """One headless ComfyUI process.

    Args:
        comfyui_path: ComfyUI checkout (default: ``tests/host/locate.py``'s find).
        base_dir: base directory (default: a new temp dir, removed by ``stop``
            only if this object created it).
        custom_nodes: ``{folder name: dir}`` or an iterable of dirs (folder
            name = dir name) to symlink into ``custom_nodes/``; default
            ``default_custom_nodes()`` (the pack + the CATFixture nodes).
            Pass ``default_custom_nodes(pack=False)`` while the pack itself
            is not loadable.
        models: ``{model folder: [files]}``, e.g.
            ``{"diffusion_models": [path]}``; each file is symlinked as
            ``<base>/models/<folder>/<file name>``.
        extra_args: more ``main.py`` flags.
        python: interpreter (default ``sys.executable``).
        startup_timeout: seconds to wait for ``/object_info``.
    """

    def __init__(
        self,
        comfyui_path: str | os.PathLike | None = None,
        *,
        base_dir: str | os.PathLike | None = None,
        custom_nodes: Mapping[str, os.PathLike] | Iterable[os.PathLike] | None = None,
        models: Mapping[str, Iterable[os.PathLike]] | None = None,
        extra_args: Iterable[str] = (),
        python: str | None = None,
        startup_timeout: float = 180.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if comfyui_path is None:
            from tests.host.locate import find_comfyui

            found = find_comfyui()
            if found.path is None:
                raise ComfyServerError(f"no ComfyUI path given and none found: {found.how}")
            comfyui_path = found.path
        self.comfyui_path = Path(comfyui_path).expanduser().resolve()
        if not (self.comfyui_path / "main.py").is_file():
            raise ComfyServerError(f"{self.comfyui_path} has no main.py: not a ComfyUI checkout")
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="cat-comfy-"))
        self.custom_nodes = _as_folder_map(custom_nodes)
        self.models = {k: [Path(p) for p in v] for k, v in (models or {}).items()}
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env else {}
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base_dir / "server.log"
        self._log_file = None

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _layout(self) -> None:
        cn = self.base_dir / "custom_nodes"
        cn.mkdir(parents=True, exist_ok=True)
        for name, src in self.custom_nodes.items():
            src = Path(src).resolve()
            if not src.exists():
                raise ComfyServerError(f"custom node folder {src} does not exist")
            link = cn / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src, target_is_directory=src.is_dir())
        for folder, files in self.models.items():
            d = self.base_dir / "models" / folder
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                f = Path(f).resolve()
                if not f.is_file():
                    raise ComfyServerError(f"model file {f} does not exist")
                link = d / f.name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(f)
        (self.base_dir / "frontend-empty").mkdir(exist_ok=True)

    def command(self) -> list[str]:
        return [
            self.python, "main.py",
            "--cpu",
            "--listen", LOOPBACK,
            "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--front-end-root", str(self.base_dir / "frontend-empty"),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self._layout()
        self.port = free_port()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        env.update(self.env)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(("$ " + " ".join(self.command()) + "\n").encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.comfyui_path),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() ends it and its children
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.proc.returncode} during startup"
                    + self._tail_msg()
                )
            try:
                self._request("GET", "/object_info", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last_err = e
                time.sleep(0.25)
        raise ComfyServerError(
            f"ComfyUI not ready after {self.startup_timeout:.0f}s ({last_err})" + self._tail_msg()
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------
    # log
    # ------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def custom_node_import_status(self) -> dict[str, bool]:
        """``{folder name: imported ok}`` from ComfyUI's "Import times for
        custom nodes" log block (ComfyUI keeps running when a pack fails)."""
        out: dict[str, bool] = {}
        cn = (self.base_dir / "custom_nodes").resolve()
        for line in self.log_text().splitlines():
            head, sep, path = line.partition(": ")
            if not sep or "seconds" not in head:
                continue
            p = Path(path.strip())
            try:
                same_dir = p.parent.resolve() == cn
            except OSError:
                same_dir = False
            if same_dir:
                out[p.name] = "(IMPORT FAILED)" not in head
        return out

    def _tail_msg(self, lines: int = 80) -> str:
        return f"\n--- server log tail ({self.log_path}) ---\n{self.log_tail(lines)}"

    # ------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------
    def _request(self, method: str, route: str, payload: Any = None, timeout: float = 30.0) -> Any:
        if self.port is None:
            raise ComfyServerError("server not started")
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + route, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, route: str, timeout: float = 30.0) -> Any:
        return self._request("GET", route, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes) or ``/object_info/<class>``."""
        route = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self._request("GET", route)

    def post_prompt(self, api_prompt: Mapping[str, Any]) -> str:
        """Queue an API-format prompt (``{node_id: {"class_type", "inputs"}}``).

        Returns the prompt id; raises ComfyServerError with ComfyUI's
        validation errors (HTTP 400) and the log tail.
        """
        payload = {"prompt": dict(api_prompt), "client_id": self.client_id}
        try:
            out = self._request("POST", "/prompt", payload)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyServerError(f"POST /prompt rejected (HTTP {e.code}): {detail}" + self._tail_msg()) from None
        if out.get("node_errors"):
            raise ComfyServerError(f"POST /prompt node_errors: {out['node_errors']}" + self._tail_msg())
        return out["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        route = "/history" if prompt_id is None else "/history/" + urllib.parse.quote(prompt_id)
        return self._request("GET", route)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Block until ``prompt_id`` finished; return its ``/history`` entry.

        The entry has ``status`` (``status_str``, ``completed``,
        ``messages``) and ``outputs`` ({node_id: ui dict}).  Raises
        ComfyServerError (with the log tail) on an execution error, when the
        server dies, or after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ComfyServerError(f"server died while waiting for {prompt_id}" + self._tail_msg())
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    msgs = [m for m in status.get("messages", []) if m and m[0] in ("execution_error", "execution_interrupted")]
                    raise ComfyServerError(
                        f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}" + self._tail_msg()
                    )
                return entry
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f}s" + self._tail_msg())
            time.sleep(poll)

    def run(self, api_prompt: Mapping[str, Any], timeout: float = 120.0) -> dict:
        """``wait(post_prompt(api_prompt), timeout)``."""
        return self.wait(self.post_prompt(api_prompt), timeout=timeout)


# ----------------------------------------------------------------------
# pytest fixture
# ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def comfy_server_factory(comfyui_root, tmp_path_factory):
    """Factory ``make(custom_nodes=None, models=None, extra_args=()) -> ComfyServer``.

    Each call starts a server in a fresh temp base dir; all of them are
    stopped at session teardown (stop them earlier with ``srv.stop()``).
    Requires a ComfyUI checkout (skips otherwise, via ``comfyui_root``).
    """
    servers: list[ComfyServer] = []

    def make(custom_nodes=None, models=None, extra_args=(), **kwargs) -> ComfyServer:
        srv = ComfyServer(
            comfyui_root,
            base_dir=tmp_path_factory.mktemp("comfy-base"),
            custom_nodes=custom_nodes,
            models=models,
            extra_args=extra_args,
            **kwargs,
        )
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        srv.stop()
