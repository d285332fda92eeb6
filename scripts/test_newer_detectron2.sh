#!/usr/bin/env bash
# Runs the test suite against a newer detectron2 with numpy 2 and Pillow 11, leaving .venv as it is.
#
# Many users run detectron2 main (numpy 2, Pillow >= 10); .venv has v0.6 (numpy < 1.24). GitHub is
# not reachable from our machines, so this uses PyPI's sal-detectron2 0.7.2 wheel, which carries a
# late-2024 snapshot of detectron2 main's Python sources (its compiled _C is for Python 3.10 and is
# replaced by .venv's ops-free one). An overlay environment puts that detectron2, numpy 2,
# Pillow 11 and opencv (main's SemSegEvaluator computes boundary IoU with it) in front of .venv's
# packages (torch and the rest are reused). Arguments go to pytest.
#
# Usage: scripts/test_newer_detectron2.sh [pytest args]     (after `make test` created .venv)
set -euo pipefail

cd "$(dirname "$0")/.."
BASE=$(realpath -m "${VENV:-.venv}")
OVERLAY=$(realpath -m "${OVERLAY:-.venv-d2main}")
WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl

if [ ! -x "$BASE/bin/python" ]; then
    echo "$BASE does not exist: run 'make test' (or scripts/install_env.sh) first" >&2
    exit 1
fi
if [ ! -f "$OVERLAY/.ready" ]; then
    rm -rf "$OVERLAY"
    python3 -m venv "$OVERLAY"
    site=$("$OVERLAY/bin/python" -c "import site; print(site.getsitepackages()[0])")
    "$BASE/bin/python" -c "import site; print(site.getsitepackages()[0])" >"$site/zz_base_venv.pth"
    "$OVERLAY/bin/python" -m pip --disable-pip-version-check install --progress-bar off -q \
        "numpy>=2,<3" "Pillow>=11,<12" "scipy>=1.13" matplotlib pycocotools opencv-python-headless
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$BASE/bin/python" scripts/fetch_sdist.py sal-detectron2 "$WHEEL" "$work"
    (cd "$work" && "$BASE/bin/python" -m zipfile -e "$WHEEL" unpacked)
    rm -f "$work"/unpacked/detectron2/_C.*.so
    cp -r "$work/unpacked/detectron2" "$site/"
    cp "$("$BASE/bin/python" -c "import detectron2, os; print(os.path.dirname(detectron2.__file__))")"/_C.*.so \
        "$site/detectron2/"
    touch "$OVERLAY/.ready"
fi
"$OVERLAY/bin/python" -c "import detectron2, numpy, PIL; print('[newer detectron2]', \
detectron2.__version__, detectron2.__file__, 'numpy', numpy.__version__, 'Pillow', PIL.__version__)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$OVERLAY/bin/python" -m pytest tests -p no:cacheprovider "$@"
