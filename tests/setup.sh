#!/usr/bin/env bash
# Set up one Python environment for every test tier (host-free, host, browser):
#
#   bash tests/setup.sh [COMFYUI_DIR]
#
# COMFYUI_DIR defaults to $COMFYUI_PATH, else the ComfyUI tree the pack is cloned into
# (ComfyUI/custom_nodes/<pack>); without one, only the host-free tier is set up.
#
# - Python: the active virtualenv if there is one (e.g. ComfyUI's own), else $CAT_VENV
#   (default: .venv in the pack), created if missing.
# - torch + torchvision: kept if they already import; else `pip install $TORCH_INSTALL`,
#   by default from PyTorch's CPU wheel index (a CPU build, no CUDA packages).
# - ComfyUI's requirements.txt without its torch lines (torchaudio is left out: only audio
#   models need it, and a PyPI build may not match the torch above), requirements-test.txt,
#   and playwright (its Python package only; it drives a system Chromium, downloads no browser).
# - Chromium for the browser tests: Debian/Ubuntu's package, installed with apt-get when
#   it is missing and apt-get can run (as root, or with password-less sudo).
set -euo pipefail

PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PACK"
PYTHON="${PYTHON:-python3}"
TORCH_INSTALL="${TORCH_INSTALL:-torch torchvision --index-url https://download.pytorch.org/whl/cpu}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '== %s\n' "$*"; }

if [ -n "${1:-}" ]; then
    COMFY="$(cd "$1" && pwd)"
else
    COMFY="$("$PYTHON" tests/host/locate.py || true)"
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    say "using the active virtualenv $VIRTUAL_ENV"
else
    VENV="${CAT_VENV:-$PACK/.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    say "using virtualenv $VENV"
fi

# ComfyUI imports torchvision at module level (comfy/ldm/cosmos); the host-free tier needs torch only.
TORCH_CHECK='import torch'
[ -n "$COMFY" ] && TORCH_CHECK='import torch, torchvision'
if python -c "$TORCH_CHECK" >/dev/null 2>&1; then
    say "already importable, kept: $TORCH_CHECK (torch $(python -c 'import torch; print(torch.__version__)'))"
else
    say "pip install $TORCH_INSTALL"
    # shellcheck disable=SC2086
    python -m pip install --quiet $TORCH_INSTALL
    if ! python -c "$TORCH_CHECK" 2>"${TMPDIR:-/tmp}/cat-torch-check.$$"; then
        tail -n 3 "${TMPDIR:-/tmp}/cat-torch-check.$$" >&2
        echo "== FAIL: torch and torchvision do not import together (a torchvision built for another torch?)." >&2
        echo "   Install a matching pair, e.g. TORCH_INSTALL='torch==2.14.1 torchvision==0.29.1' bash tests/setup.sh" >&2
        exit 1
    fi
fi

REQS=(-r requirements-test.txt)
if [ -n "$COMFY" ]; then
    if [ ! -f "$COMFY/requirements.txt" ] || [ ! -d "$COMFY/comfy" ]; then
        echo "== FAIL: $COMFY is not a ComfyUI checkout (no requirements.txt or comfy/)" >&2
        exit 1
    fi
    say "ComfyUI at $COMFY: its requirements.txt (torch lines left to the step above), playwright"
    FILTERED="$(mktemp)"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" >"$FILTERED"
    REQS+=(-r "$FILTERED" playwright)
else
    say "no ComfyUI found (give its folder, set COMFYUI_PATH, or clone the pack into ComfyUI/custom_nodes/):"
    say "setting up the host-free tier only"
fi
# torch stays as installed above: pip must not swap it for another build.
CONSTRAINTS="$(mktemp)"
python - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
EOF
python -m pip install --quiet -c "$CONSTRAINTS" "${REQS[@]}"

cuda_pkgs="$(python -m pip list --format=freeze 2>/dev/null | grep -ciE '^nvidia-' || true)"
say "torch $(python -c 'import torch; print(torch.__version__, "cuda available:", torch.cuda.is_available())'); nvidia-* packages: $cuda_pkgs"

if [ -n "$COMFY" ]; then
    chromium=""
    for c in "${CAT_CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { chromium="$(command -v "$c")"; break; }
    done
    if [ -z "$chromium" ] && command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
        say "installing Chromium from the system's packages (apt-get install chromium)"
        if $SUDO apt-get update -qq >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
            chromium="$(command -v chromium || true)"
        fi
    fi
    if [ -n "$chromium" ]; then
        say "Chromium for the browser tests: $chromium"
    else
        say "no Chromium found: the browser tests will skip. Install one (Debian/Ubuntu: apt-get install chromium)"
        say "or set CAT_CHROMIUM to a Chromium/Chrome binary."
    fi
fi
say "ready: $(command -v python) -m pytest -q"
