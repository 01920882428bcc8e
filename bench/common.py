"""Shared pieces of the benchmarks: images, shards, timers, models, the F/K loop.

Nothing here is downloaded: the models are keras.applications built with
`weights=None` through `transforms.model_loading.load_keras_model` (fixed
seed, so every process and every copy has the same random weights), and the
images are synthetic but natural-looking (1/f noise, a smooth illumination
gradient, one object, sensor noise) so JPEG/PNG sizes and decode costs are
those of photographs rather than of flat colours.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import numpy as np

from pipeline.demo import encode, make_example
from transforms.cam.explainer import CamExplainer
from transforms.model_loading import load_keras_model
from transforms.records import write_records

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGE_SIZE = 224
BATCH_SIZE = 32
METHOD_NAMES = ("gradcam", "gradcampp", "hirescam", "layercam", "xgradcam")


def natural_images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """n uint8 images [n, size, size, 3] with photo-like statistics.

    Octaves of bilinearly upsampled noise with amplitude ~ 1/frequency, a
    per-image colour cast and illumination gradient, one soft-edged ellipse
    and mild per-pixel noise.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    image = np.zeros((n, size, size, 3), np.float32)
    for cells, amplitude in ((3, 55.0), (6, 35.0), (12, 22.0), (28, 12.0), (56, 7.0), (112, 4.0)):
        coarse = rng.normal(0.0, 1.0, (n, cells, cells, 3)).astype(np.float32)
        coarse[..., 1:] = 0.6 * coarse[..., :1] + 0.4 * coarse[..., 1:]  # correlated channels
        image += amplitude * tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        base = rng.uniform(60, 190, 3)
        gy, gx = rng.uniform(-50, 50, 2)
        image[i] += base + gy * (yy[..., None] - 0.5) + gx * (xx[..., None] - 0.5)
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.08, 0.25, 2)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        alpha = np.clip(1.5 - d, 0.0, 1.0)[..., None]
        image[i] = image[i] * (1 - alpha) + alpha * (rng.uniform(0, 255, 3) + 0.5 * (image[i] - base))
    image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_shards(folder: str, n: int, fmt: str, *, shards: int = 4, pool: int = 64, seed: int = 0) -> dict:
    """Writes n tf.train.Examples (JPEG or PNG, labels 0..999) over `shards` files.

    `pool` distinct images are cycled (every record has its own id and label);
    decode cost depends on the bytes, not on whether they repeat.

    Returns:
      {"pattern": glob, "images": n, "bytes_per_image": mean encoded size}.
    """
    os.makedirs(folder, exist_ok=True)
    images = natural_images(min(pool, n), seed=seed)
    encoded = [encode(image, fmt) for image in images]
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, 1000, n)
    per_shard: list[list[bytes]] = [[] for _ in range(shards)]
    for i in range(n):
        per_shard[i % shards].append(
            make_example(encoded[i % len(encoded)], label=int(labels[i]), image_id=f"bench-{i:06d}")
        )
    for s, records in enumerate(per_shard):
        write_records(os.path.join(folder, f"bench-{s:05d}-of-{shards:05d}.tfrecord"), records)
    return {
        "pattern": os.path.join(folder, "*.tfrecord"),
        "images": n,
        "bytes_per_image": float(np.mean([len(e) for e in encoded])),
    }


def load_model(name: str):
    """A fresh copy of keras.applications `name` with the project's fixed random weights."""
    return load_keras_model(name)


# Calls per measurement; --quick lowers them (see `set_quick`).
TIMING = {"min_calls": 2, "warmup": 1}


def set_quick() -> None:
    TIMING.update(min_calls=1, warmup=1)


def images_per_second(step: Callable[[], object], batch: int, *, min_seconds: float,
                      cpu: Optional[list] = None) -> float:
    """Calls `step` (one batch, result materialised) until min_seconds and min_calls.

    Returns wall-clock images/s; when `cpu` is a list, appends images per
    CPU-second of this process (all threads), which a busy shared machine
    disturbs less than wall time.
    """
    for _ in range(TIMING["warmup"]):
        step()
    calls, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - started
        if calls >= TIMING["min_calls"] and elapsed >= min_seconds:
            if cpu is not None:
                cpu.append(calls * batch / max(time.process_time() - cpu_started, 1e-9))
            return calls * batch / elapsed


def round_robin(steps: dict, batch: int, *, min_seconds: float, warmup: bool = True) -> tuple[dict, dict]:
    """Times several steps call by call in turn (F, K1, K2, ..., F, K1, ...).

    Interleaving single calls makes every step see the same background load,
    which matters on a shared 2-core machine: the ratios stay fair even when
    the absolute numbers move.

    Returns:
      ({key: images/s wall}, {key: images per CPU-second of this process}).
    """
    for _ in range(TIMING["warmup"] if warmup else 0):
        for step in steps.values():
            step()
    wall = dict.fromkeys(steps, 0.0)
    cpu = dict.fromkeys(steps, 0.0)
    calls = 0
    while True:
        for key, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[key] += time.perf_counter() - t0
            cpu[key] += time.process_time() - c0
        calls += 1
        if calls >= TIMING["min_calls"] and min(wall.values()) >= min_seconds:
            break
    return ({k: calls * batch / v for k, v in wall.items()},
            {k: calls * batch / max(v, 1e-9) for k, v in cpu.items()})


def write_results(results: dict, path: str, table: Callable[[dict], str], default=float) -> dict:
    """Adds the printed table to `results`, writes them as JSON to `path` and prints the table."""
    text = table(results)
    results["table"] = text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2, default=default)
    print()
    print(text)
    print(f"\nWrote {path} ({results['meta']['total_seconds']:.0f} s)")
    return results


def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def forward_probe(model_name: str, *, min_seconds: float, batch: int = BATCH_SIZE, seed: int = 0):
    """A callable that measures F once more (images/s wall, images per CPU-second), for P's repeats.

    P's pairs run for minutes and F moves with the machine (MobileNetV2 read
    32 and 42 img/s on one afternoon here), so each P repeat is divided by
    the F measured right before and after it (`bench.run_bench.measure_pipeline`).
    """
    images = natural_images(batch, seed=seed).astype(np.float32)
    explainer = CamExplainer(load_model(model_name))
    explainer.forward(images).numpy()  # trace once

    def probe() -> tuple[float, float]:
        cpu: list = []
        wall = images_per_second(lambda: explainer.forward(images).numpy(), batch, min_seconds=min_seconds, cpu=cpu)
        return wall, cpu[0]

    return probe


def measure_forward_and_cams(model_name: str, methods, *, repeats: int, min_seconds: float,
                             batch: int = BATCH_SIZE, seed: int = 0, jit_compile: bool = False,
                             log=print) -> dict:
    """F (CamExplainer.forward) and K (CamExplainer.__call__ -> .explain) per method.

    One explainer (own model copy) per method; F uses the first explainer's
    `.forward`. Repeats interleave F and every K so drift hits all alike.

    Returns:
      {"forward": {"runs": [...], "median": ips}, "cam": {method: {...}},
       "target_layer": ..., "cam_shape": ...}
    """
    images = natural_images(batch, seed=seed).astype(np.float32)
    labels = np.full([batch], -1, np.int32)
    explainers = {}
    for method in methods:
        started = time.perf_counter()
        explainers[method] = CamExplainer(load_model(model_name), method=method, jit_compile=jit_compile)
        explainers[method](images[:2], labels[:2])  # trace once
        log(f"  {model_name}: built + traced {method} in {time.perf_counter() - started:.1f} s")
    first = explainers[methods[0]]
    steps = {"forward": lambda: first.forward(images).numpy()}
    for method, explainer in explainers.items():
        steps[method] = lambda e=explainer: e(images, labels)
    runs = {key: [] for key in steps}
    cpu_runs = {key: [] for key in steps}
    load = []
    for r in range(repeats):
        load.append(os.getloadavg()[0])
        wall, cpu = round_robin(steps, batch, min_seconds=min_seconds, warmup=r == 0)
        for key in steps:
            runs[key].append(wall[key])
            cpu_runs[key].append(cpu[key])
        log(
            f"  {model_name} repeat {r + 1}/{repeats}: F {wall['forward']:.1f} img/s, "
            + ", ".join(f"K[{m}] {wall[m]:.1f}" for m in methods)
            + f" (load {load[-1]:.1f})"
        )
    forward_runs, forward_cpu = runs["forward"], cpu_runs["forward"]
    cam_runs = {m: runs[m] for m in methods}
    cam_cpu = {m: cpu_runs[m] for m in methods}
    return {
        "target_layer": first.target_layer,
        "cam_shape": list(first.cam_shape),
        "load_average_1min": load,
        "forward": {"runs": forward_runs, "median": median(forward_runs),
                    "cpu_runs": forward_cpu, "cpu_median": median(forward_cpu)},
        "cam": {m: {"runs": runs, "median": median(runs), "cpu_runs": cam_cpu[m],
                    "cpu_median": median(cam_cpu[m])} for m, runs in cam_runs.items()},
    }


# ------------------------------------------------- tables and pipeline runs ----


def fmt(value, spec: str = ".1f") -> str:
    """A number of a bench table; "-" for None or NaN."""
    if value is None or value != value:
        return "-"
    return format(value, spec)


def grid(rows) -> list[str]:
    """Rows of cells as aligned text lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]


def pipeline_flags() -> list[str]:
    """Flags for the measured runs: the Parquet tables only (no HTML report), so P measures the data path."""
    return ["--no_report"]


class RunawayMemory(RuntimeError):
    """A measured run grew past the bench's memory limit and was stopped (by its PID)."""


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_pipeline_process(pattern: str, model_name: str, output: str, *, levers=(), extra_args=(),
                         profile: str | None = None, profile_out: str | None = None,
                         timeout: float = 1800, cpus: set | None = None, max_rss_mb: float | None = None) -> dict:
    """Runs `bench.pipeline_worker` (-> pipeline.graph.run) in a fresh process (on `cpus` only, if given:
    its CPU affinity, which TensorFlow's thread pools follow). A run whose RSS passes `max_rss_mb`
    (default: a third of the machine's memory) is stopped and raises RunawayMemory, before the
    kernel's OOM killer picks a process of its own."""
    if max_rss_mb is None:
        max_rss_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 3 / 2**20
    result_path = output.rstrip("/") + ".result.json"
    cmd = [sys.executable, "-m", "bench.pipeline_worker", "--result", result_path]
    for lever in levers:
        cmd += ["--lever", lever]
    if profile:
        cmd += ["--profile", profile]
        if profile_out:
            cmd += ["--profile_out", profile_out]
    cmd += ["--", "--input", pattern, "--model", model_name, "--output", output,
            "--batch_size", str(BATCH_SIZE), "--quiet", *pipeline_flags(), *extra_args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    with open(output.rstrip("/") + ".log", "w") as log_file:
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=pin)
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                raise RuntimeError(f"pipeline run timed out after {timeout} s: {' '.join(cmd)}")
            rss = rss_mb(proc.pid)
            if rss > max_rss_mb:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RunawayMemory(f"pipeline run stopped at {rss:.0f} MB RSS (limit {max_rss_mb:.0f}): {' '.join(cmd)}")
            time.sleep(0.05)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(output.rstrip("/") + ".log") as handle:
            tail = handle.read()[-3000:]
        raise RuntimeError(f"pipeline run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    with open(result_path) as handle:
        result = json.load(handle)
    result["process_seconds"] = wall
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole process, imports included
    result["load_average_1min"] = os.getloadavg()[0]
    return result
