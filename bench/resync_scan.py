"""How fast `find_next_record` scans damaged bytes for the next good record.

    python -m bench.resync_scan [--mib 200]

Writes a shard of one large damaged record followed by a good one, for two
kinds of damaged content (random bytes; zeros, the worst case for the
length prefilter), and prints the scan rate in MiB/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from transforms.records import find_next_record, write_records


def scan_rate(payload: bytes, folder: str) -> float:
    path = os.path.join(folder, "scan.tfrecord")
    write_records(path, [payload, b"the good record after the damage"])
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        started = time.perf_counter()
        found = find_next_record(handle, 1, size)
        seconds = time.perf_counter() - started
    assert found == 12 + len(payload) + 4, found
    return len(payload) / (1 << 20) / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="size of the damaged span")
    args = parser.parse_args(argv)
    n = args.mib << 20
    with tempfile.TemporaryDirectory() as folder:
        for name, payload in (("random bytes", np.random.default_rng(0).bytes(n)), ("zeros", bytes(n))):
            print(f"{name:>12}: {scan_rate(payload, folder):7.1f} MiB/s over {args.mib} MiB")


if __name__ == "__main__":
    main()
