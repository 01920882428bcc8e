"""The built-in demo, as a user runs it: the shortcut class shows in the summary."""

import os
import re
import subprocess
import sys

from pipeline.demo import CLASS_NAMES, SHORTCUT_CLASS


def test_demo_summary_flags_the_shortcut_class(tmp_path):
    env = dict(os.environ, GRADCAM_AUDIT_DEMO_DIR=str(tmp_path / "demo"))
    proc = subprocess.run([sys.executable, "-m", "pipeline"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Explained 400 of 403 records (rejected: decode 3; shard errors: 0)." in out
    shortcut = f"{SHORTCUT_CLASS} {CLASS_NAMES[SHORTCUT_CLASS]}"
    line = next(line for line in out.splitlines() if line.startswith(shortcut))
    assert "top-left corner" in line, out
    flags = [line for line in out.splitlines() if line.startswith("! class")]
    assert len(flags) == 1 and flags[0].startswith(f"! class {shortcut}:"), out
    accuracies = [float(m) for m in re.findall(r"^\d \w+\s+\d+\s+([\d.]+)", out, re.M)]
    assert len(accuracies) == 4 and min(accuracies) > 0.8, out
    # A second run reuses the data and model.
    again = subprocess.run([sys.executable, "-m", "pipeline"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "Making the demo" not in again.stdout
