"""The command `python -m pipeline.compare` (the comparison lives in `pipeline/runs/compare.py`)."""

import sys

from pipeline.runs.compare import main

if __name__ == "__main__":
    sys.exit(main())
