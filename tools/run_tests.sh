#!/usr/bin/env bash
# Set up .venv (see tools/setup_env.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash tools/run_tests.sh -k backbone` or `bash tools/run_tests.sh -m "not slow"`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest tests "$@"
