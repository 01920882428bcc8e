"""Readers of finished runs: they work on a run folder (or an output folder of runs) alone.

- `manifest`: the run manifest, and reading a table of a run (`read_table`) without loading
  it into Python objects.
- `history`: `runs.json`, the index of an output folder's runs, and moving a finished run into place.
- `compare`: a run against an earlier one (`python -m pipeline.compare`).
- `summary`: the lines the launcher prints when a run ends.

The report (`pipeline/report/`) reads runs too; the job's last stage (`pipeline/finalize.py`) uses
all of them to finish a run.
"""
