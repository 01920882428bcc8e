"""`python -m pipeline.report RUN_DIR [--out PATH] [--per_flag N]` (pipeline/report/page.py)."""

import sys

from pipeline.report.page import main

sys.exit(main())
