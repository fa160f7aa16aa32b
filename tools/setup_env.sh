#!/usr/bin/env bash
# Create (or refresh) the project's environment in .venv/ at the repository root:
# torch, mmcv 2.1.0 with compiled ops built against that torch, then mmengine, mmdet,
# mmsegmentation and restv2_mm itself in editable mode. Safe to run again: steps whose
# result is already in place are skipped, so a second run takes seconds.
#
#   bash tools/setup_env.sh          # then: source .venv/bin/activate
#
# Environment knobs: PYTHON (interpreter to build the venv from, default python3),
# TORCH_VERSION (CPU torch to install when no CUDA torch is present, default 2.13.0),
# MAX_JOBS (parallel compile jobs for mmcv, default: all cores).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MMCV_VERSION=2.1.0
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

step() { printf '\n[setup] %s\n' "$*"; }
fail() {
    printf '\n[setup] FAILED at step: %s\n[setup] %s\n' "$1" "$2" >&2
    exit 1
}
# Run a long command ("$2"...), printing every PROGRESS_EVERY seconds (default 60) that it is
# still at work on "$1", with the time elapsed, so that a quiet compile does not look hung.
TICKER=
trap '[ -n "$TICKER" ] && kill "$TICKER" 2>/dev/null; true' EXIT
with_progress() {
    local what=$1 start rc=0 s
    shift
    start=$(date +%s)
    (
        while sleep "${PROGRESS_EVERY:-60}" </dev/null >/dev/null 2>&1; do
            s=$(( $(date +%s) - start ))
            printf '[setup] still %s: %d min %02d s elapsed\n' "$what" $(( s / 60 )) $(( s % 60 ))
        done
    ) &
    TICKER=$!
    "$@" || rc=$?
    kill "$TICKER" 2>/dev/null || true
    wait "$TICKER" 2>/dev/null || true
    TICKER=
    s=$(( $(date +%s) - start ))
    [ "$rc" = 0 ] && printf '[setup] done %s in %d min %02d s\n' "$what" $(( s / 60 )) $(( s % 60 ))
    return "$rc"
}

# 1. The virtual environment. A CUDA build of torch in the base interpreter is kept by
#    letting the venv see the base site-packages; otherwise the venv is isolated.
if [ ! -x "$PY" ]; then
    step "creating $VENV"
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null ||
        fail "python" "'$PYTHON' is missing or older than 3.8; set PYTHON=/path/to/python3."
    venv_args=()
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        echo "[setup] keeping the CUDA torch of $PYTHON (venv with system site-packages)"
        venv_args+=(--system-site-packages)
    fi
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV" ||
        fail "venv" "could not create $VENV; on Debian/Ubuntu install python3-venv."
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# 2. Build tools. mmcv's build imports pkg_resources, which setuptools >= 81 no longer has.
if ! "$PY" -c 'import setuptools, wheel, sys; v = int(setuptools.__version__.split(".")[0]); sys.exit(0 if 77 <= v < 81 else 1)' 2>/dev/null; then
    step "installing build tools"
    "${PIP[@]}" install -q --upgrade pip 'setuptools>=77,<81' wheel ninja ||
        fail "build tools" "pip could not install setuptools/wheel; check your network or pip config."
fi

# 3. torch: keep any working torch (CUDA or not); otherwise install the CPU/default build.
if "$PY" -c 'import torch' 2>/dev/null; then
    echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)') present"
else
    step "installing torch==$TORCH_VERSION"
    with_progress "installing torch" "${PIP[@]}" install -q "torch==$TORCH_VERSION" ||
        fail "torch" "pip could not install torch==$TORCH_VERSION; set TORCH_VERSION to one pip can find, or install torch into .venv first."
fi
CUDA=$("$PY" -c 'import torch; print(1 if torch.cuda.is_available() else 0)')

# 4. mmcv with compiled ops, built against the installed torch (pip caches the wheel).
if ! "$PY" -c "import mmcv, mmcv.ops, sys; sys.exit(0 if mmcv.__version__ == '$MMCV_VERSION' else 1)" 2>/dev/null; then
    step "building mmcv==$MMCV_VERSION with ops against torch (10 to 20 minutes on 2 cores the first time; pip caches the wheel)"
    "${PIP[@]}" install -q numpy 'opencv-python-headless' addict packaging Pillow pyyaml yapf 'mmengine>=0.10.5,<0.11' ||
        fail "mmcv dependencies" "pip could not install mmcv's build dependencies."
    export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    [ "$CUDA" = 1 ] && export FORCE_CUDA=1
    with_progress "building mmcv" "${PIP[@]}" install --no-build-isolation "mmcv==$MMCV_VERSION" ||
        fail "mmcv" "building mmcv $MMCV_VERSION failed (see the compiler output above); it needs gcc/g++ and the Python headers (python3-dev)."
fi

# 5. The rest, and restv2_mm in editable mode. Skipped when setup.py has not changed.
stamp="$VENV/.restv2_mm-installed"
want=$(cat setup.py 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c 'import restv2_mm, mmdet, mmseg' 2>/dev/null; then
    step "installing mmengine, mmdet, mmsegmentation and restv2_mm (editable)"
    "${PIP[@]}" install -q --no-build-isolation -e ".[tests]" ||
        fail "restv2_mm" "pip could not install the package or its requirements (setup.py)."
    echo "$want" > "$stamp"
fi

"$PY" -c "import torch, mmcv, mmengine, mmdet, mmseg, restv2_mm; print('[setup] ready: torch', torch.__version__, '| mmcv', mmcv.__version__, '| mmengine', mmengine.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| restv2_mm', restv2_mm.__version__)" ||
    fail "check" "the environment does not import; run 'bash tools/setup_env.sh' again after removing .venv/."
