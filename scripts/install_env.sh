#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs everything into it:
# torch, detectron2, the requirements, panopticapi and this package (editable).
#
# Idempotent: a stamp keyed on the hash of the files that decide the installation lets a second run
# return at once. Set DETECTRON2_SOURCE to a local checkout, wheel or pip-installable URL to install
# that detectron2 instead of PyPI's pb1-detectron2==0.6 (upstream v0.6 sources).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.mask_former-install-stamp"

key=$( (cat requirements/*.txt scripts/install_env.sh scripts/fetch_sdist.py setup.py; \
        echo "DETECTRON2_SOURCE=${DETECTRON2_SOURCE:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
    echo "[install] $VENV is up to date (stamp $key); skipping installation."
    exit 0
fi

step() { echo; echo "[install] $(date +%H:%M:%S) $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
step "upgrading pip, setuptools, wheel"
"${PIP[@]}" install --progress-bar off -q -U pip setuptools wheel

step "installing torch, torchvision and the requirements (requirements/base.txt)"
"${PIP[@]}" install --progress-bar off -r requirements/base.txt -c requirements/constraints.txt \
    | grep -vE "^(Requirement already satisfied|  Using cached)" || true
"$PY" -c "import torch, torchvision; print('[install] torch', torch.__version__, 'torchvision', torchvision.__version__)"

if [ -n "${DETECTRON2_SOURCE:-}" ]; then
    step "installing detectron2 from DETECTRON2_SOURCE=$DETECTRON2_SOURCE"
    "${PIP[@]}" install --progress-bar off --no-build-isolation "$DETECTRON2_SOURCE" -c requirements/constraints.txt
elif "$PY" -c "from detectron2 import _C; _C.get_compiler_version()" 2>/dev/null; then
    step "detectron2 is already installed in $VENV; keeping it"
else
    step "installing detectron2 v0.6 from PyPI's pb1-detectron2 sdist (Python sources; no compiled ops)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" scripts/fetch_sdist.py pb1-detectron2 pb1-detectron2-0.6.tar.gz "$work"
    tar -xzf "$work/pb1-detectron2-0.6.tar.gz" -C "$work"
    src="$work/pb1-detectron2-0.6"
    # The sdist lacks detectron2/layers/csrc: an ops-free extension makes `detectron2._C`
    # importable. It answers the version queries of detectron2's environment report
    # (default_setup logs it); every compiled op is absent.
    mkdir -p "$src/detectron2/layers/csrc"
    cat > "$src/detectron2/layers/csrc/vision.cpp" <<'CPP'
#include <torch/extension.h>
#include <string>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", []() { return std::string("none (ops-free detectron2._C)"); });
  m.def("get_cuda_version", []() { return std::string("none (ops-free detectron2._C)"); });
  m.def("has_cuda", []() { return false; });
}
CPP
    echo "[install] compiling the ops-free detectron2._C extension (about a minute on 2 cores)"
    "${PIP[@]}" install --progress-bar off --no-build-isolation --no-deps "$src"
fi
"$PY" -c "import detectron2, os; print('[install] detectron2', detectron2.__version__, 'from', os.path.dirname(detectron2.__file__))"

step "installing panopticapi (panopticapi-lite, without its conflicting pins)"
"${PIP[@]}" install --progress-bar off -q --no-deps panopticapi-lite

step "installing mask_former (editable)"
"${PIP[@]}" install --progress-bar off -q --no-build-isolation --no-deps -e .

echo "$key" > "$STAMP"
step "done: $VENV is ready"
