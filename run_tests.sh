#!/usr/bin/env bash
# Sets up .venv if needed, then runs the tests. Extra arguments go to pytest:
#   ./run_tests.sh                  everything (cluster tests included)
#   ./run_tests.sh -m "not cluster" the fast suite
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
"$repo/scripts/setup_venv.sh"
cd "$repo"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$repo/.venv/bin/python" -m pytest "$@"
