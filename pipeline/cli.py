"""Command line entry point: errors become one line and exit status 2."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.graph import run
    from pipeline.summary import summary_text
    from transforms.errors import AuditError

    try:
        _, manifest = run(sys.argv[1:] if argv is None else argv)
    except AuditError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    if not manifest["options"]["quiet"]:
        print(summary_text(manifest))


if __name__ == "__main__":
    main()
