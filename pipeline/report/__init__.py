"""The visual report of one run (`python -m pipeline.report RUN_DIR`): one self-contained HTML file.

- `page`: reads the run (manifest, class_stats, exemplars, comparison) and writes the page's markup;
  `write_report` / `render_report` / `main`.
- `figures`: the matplotlib plots, as PNG data: URIs.
- `strategies`: the strategy strips (SpRAy clusters per class).

Shared escaping and number formatting: `pipeline/formatting.py`.
"""

from pipeline.report.page import REPORT_NAME, render_report, write_report

__all__ = ["REPORT_NAME", "render_report", "write_report"]
