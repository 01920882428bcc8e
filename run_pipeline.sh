#!/usr/bin/env bash
# Sets up .venv if needed, then runs the audit: `./run_pipeline.sh` alone runs
# the built-in demo on the local runner; any option of `python -m pipeline`
# (see --help) and any Apache Beam option can be given.
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
"$repo/scripts/setup_venv.sh"
export GRADCAM_AUDIT_DEMO_DIR="${GRADCAM_AUDIT_DEMO_DIR:-$repo/.demo}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$repo/.venv/bin/python" -m pipeline "$@"
