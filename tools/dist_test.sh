#!/usr/bin/env bash
# Test a checkpoint with GPUS processes on this machine (torchrun), e.g.
#   bash tools/dist_test.sh configs/maskrcnn_restv2_t_coco.py work_dirs/x/epoch_12.pth 8
# With CUDA: one process per GPU (NCCL). Without: GPUS processes on the CPU (gloo).
# One machine picks a free port unless PORT is set. Several machines: NNODES, NODE_RANK,
# MASTER_ADDR and PORT (default 29500), as mmdet's script. PYTHON: the interpreter to use.
set -e
if [ $# -lt 3 ]; then
    echo "usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
        PYTHON="$ROOT/.venv/bin/python"
    fi
fi

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m restv2_mm.utils.launch "$3" "$ROOT/tools/test.py" "$1" "$2" \
    --launcher pytorch "${@:4}"
