"""What fanning the records out (`--reshuffle_records on`) costs: shuffle bytes and wall time.

    python -m bench.fanout [--images 256] [--model mobilenet_v2]

1. Shuffle bytes per image: the records of `bench.common.write_shards`
   (224x224 photo-like JPEGs in tf.train.Examples) encoded the way Beam's
   Reshuffle ships them (a random key and the ShardRecord, through the coder
   Beam infers), against the raw record size.
2. Wall time of the job (manifest `pipeline_seconds`) with the fan-out off
   and on, one shard, each run in its own process: in-process FnApiRunner
   and FnApiRunner with 2 worker processes (`--direct_num_workers=2
   --direct_running_mode=multi_processing`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shuffle_overhead(pattern: str) -> dict:
    """Mean raw record size and mean encoded (random key, ShardRecord) size, in bytes."""
    import glob

    import apache_beam as beam

    from transforms.records import ShardRecord, read_shard, shard_size

    coder = beam.coders.registry.get_coder(beam.typehints.Tuple[int, ShardRecord])
    raw, encoded, n = 0, 0, 0
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as handle:
            for index, data in enumerate(read_shard(handle, shard_size(path))):
                record = ShardRecord(path, index, data)
                raw += len(data)
                encoded += len(coder.encode((random.getrandbits(32), record)))
                n += 1
    return {"records": n, "raw_bytes_per_image": raw / n, "shuffled_bytes_per_image": encoded / n,
            "overhead_bytes_per_image": (encoded - raw) / n}


def timed_run(pattern: str, model: str, output: str, fanout: str, workers: list[str]) -> float:
    args = [sys.executable, "-m", "pipeline", "--input", pattern, "--model", model, "--output", output,
            "--run_id", "bench", "--quiet", "--no_report", "--reshuffle_records", fanout, *workers]
    subprocess.run(args, check=True, cwd=REPO, capture_output=True)
    with open(os.path.join(output, "run=bench", "run_manifest.json")) as handle:
        return json.load(handle)["timings"]["pipeline_seconds"]


def main(argv=None) -> None:
    from bench.common import load_model, write_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="mobilenet_v2")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        data = write_shards(os.path.join(folder, "data"), args.images, "jpeg", shards=1)
        model_path = os.path.join(folder, "model.keras")
        load_model(args.model).save(model_path)
        print(json.dumps(shuffle_overhead(data["pattern"]), indent=1))
        modes = {"in-process": [], "2 processes": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]}
        for name, workers in modes.items():
            for fanout in ("off", "on"):
                seconds = timed_run(data["pattern"], model_path, os.path.join(folder, f"out-{len(workers)}-{fanout}"),
                                    fanout, workers)
                print(f"{name:>12}, fan-out {fanout:>3}: {seconds:6.1f} s for {args.images} images "
                      f"({args.images / seconds:.1f} images/s)")


if __name__ == "__main__":
    main()
