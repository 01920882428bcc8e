#!/usr/bin/env bash
# Sets up everything the tests need, then runs them. Extra arguments go to pytest:
#   ./run_tests.sh                    everything (what CI runs; cluster tests included)
#   ./run_tests.sh -m "not cluster"   no Flink/GCS-emulator clusters
#   ./run_tests.sh -m "not cluster and not bench"   the fast suite (no benchmark smoke runs either)
# Installs, each idempotent: .venv/ with the project (scripts/setup_venv.sh),
# Chromium for the report's browser test (scripts/install_chromium.sh, apt),
# and unless the cluster tests are deselected, Java + the Beam Flink job
# server + Flink (scripts/flink/install.sh, into .cluster/).
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
"$repo/scripts/setup_venv.sh"
"$repo/scripts/install_chromium.sh" >/dev/null
if [[ " $* " != *"not cluster"* ]]; then
  "$repo/scripts/flink/install.sh"
fi
cd "$repo"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$repo/.venv/bin/python" -m pytest "$@"
