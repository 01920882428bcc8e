"""The "feed" measurement: can the pipeline's input path keep a fast model busy?

With a near-free model (one strided 3x3 conv + 16x16 average pooling +
global pooling + dense at 224x224: the model costs almost nothing, so the
rate is the input path's; the CAM is taken at the 7x7 pooling output, the
size of a ResNet50's or MobileNetV2's maps, so the rows are as large as theirs)
over TFRecord shards of photo-like 500x375 JPEGs (`bench.photos`):

  tf.data   the usual input pipeline feeding the same model's compiled CAM
            step (`CamExplainer.__call__`): TFRecordDataset interleave,
            map(parse + decode_jpeg + resize, AUTOTUNE), batch(32), prefetch;
            images/s over a whole pass of the 2N-image shards (after a warm-up),
            two passes per repeat; the ratios take its best pass
  P 1 thread   the whole job (`pipeline.graph.run`, FnApiRunner default: one
            worker, in memory), steady state N / (pipeline_seconds(2N) -
            pipeline_seconds(N)) as for P
  P 2 threads  the same, one process with two threads
            (--direct_num_workers=2 --direct_running_mode=multi_threading)
  P 1 core  P 1 thread with the process pinned to one CPU (its affinity;
            TensorFlow's pools follow it)
  feed ratio   P 2 threads / tf.data (both may use every core); per CPU-s:
            the same with images per CPU-second of each (the work each does per
            image, whatever the cores it kept busy); scaling =
            P 2 threads / P 1 thread; core scaling = P 1 thread / P 1 core
            (does one process use the machine's cores? on 2 cores, one Beam
            thread already keeps ~1.7 busy, so a second thread has little
            left to add and the core scaling is the measure of "scales with
            cores")
  P 1 thread, model off the CPU   P 1 thread with `bench.levers`' null_model
            (outputs of the right shapes, no model call; reading, checks,
            decode, rows, statistics and Parquet all run) against tf.data's
            decoded batches without the model: what the CPUs of a GPU
            worker, whose model runs on the device, can feed it

and the per-image decode A/B on the same JPEGs, in this process, one caller
thread: the previous eager per-record decode (parse, header, decode_image,
cast, resize, one record at a time) against the current path
(`DecodeImageExamples` checks + `decode_batch` per batch of 32).
All runs of a repeat are interleaved; medians over repeats.
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.common import BATCH_SIZE, RunawayMemory, fmt, grid, median, run_pipeline_process
from bench.photos import encode_jpeg, photo_images, write_photo_shards
from pipeline.demo import make_example
from transforms.cam.explainer import CamExplainer
from transforms.decode import BatchImageDecoder, DecodeImageExamples, decode_batch
from transforms.image_header import read_header
from transforms.model_loading import load_keras_model
from transforms.records import ShardRecord, iter_records

FEED_MODEL_NAME = "near_free.keras"
FEED_TARGET_LAYER = "pool"
TWO_THREADS = ("--direct_num_workers=2", "--direct_running_mode=multi_threading")
FEED_TARGETS = {"feed ratio": 0.9, "2-thread scaling": 1.6}
# tf.data's rate on this machine is bimodal from one pass to the next (~310 img/s with 1.2 cores busy or
# ~480 with 1.9, whatever num_parallel_calls: AUTOTUNE, 2 or 4), so it runs two passes per repeat and
# the ratios divide by its best pass: the pipeline's median against tf.data at its best.
TF_DATA_PASSES = 2
# What a GPU worker's CPUs do: everything but the model. P runs with bench.levers' null_model (outputs of
# the right shapes, no model call: reading, checks, decode, rows, statistics, Parquet all run) against
# tf.data's decoded batches alone.
NO_MODEL = "1 thread, model off the CPU"
# Where the job's CPU goes per image: the same 1-thread job with bench.levers' stubs, each stub's saving
# is its stage's cost (model step, batched decode); with both stubbed what is left is Beam's and the
# job's own Python (reading, checks, rows, statistics, Parquet).
NO_DECODE = "1 thread, decode stubbed"
NEITHER = "1 thread, model and decode stubbed"
# What the second decode thread of ExplainBatches buys: the 1-thread job decoding one batch at a time.
ONE_DECODER = "1 thread, one decode thread"
STUBS = {NO_MODEL: ("null_model",), NO_DECODE: ("null_decode",), NEITHER: ("null_model", "null_decode"),
         ONE_DECODER: ("one_decode_thread",)}


def near_free_model(path: str, size: int = 224, classes: int = 1000) -> str:
    """Saves the near-free classifier (fixed seed) to `path`; returns the path."""
    import keras

    if not os.path.exists(path):
        keras.utils.set_random_seed(7)
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.AveragePooling2D(16, name=FEED_TARGET_LAYER)(x)  # 112x112 -> 7x7
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(classes, activation="softmax", name="head")(x)
        keras.Model(inputs, outputs).save(path)
    return path


def tf_data_pass(pattern: str, explainer, size: int = 224) -> tuple[int, float, float]:
    """One pass of the usual tf.data input pipeline into the explainer: (images, wall s, CPU s).

    explainer None: the decoded batches only (the model is elsewhere, as on a GPU worker)."""
    import tensorflow as tf

    features = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        example = tf.io.parse_single_example(record, features)
        image = tf.io.decode_jpeg(example["image/encoded"], channels=3)
        return tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear")

    files = tf.data.Dataset.list_files(pattern, shuffle=False)
    dataset = (files.interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE)
               .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(BATCH_SIZE)
               .prefetch(tf.data.AUTOTUNE))
    images = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in dataset:
        if explainer is not None:
            explainer(batch)  # the pipeline's target: the predicted class
        images += int(batch.shape[0])
    return images, time.perf_counter() - started, time.process_time() - cpu_started


def eager_decode_record(data: bytes, size: int = 224) -> np.ndarray:
    """The previous per-record path: parse, header check, eager decode + cast + resize."""
    import tensorflow as tf

    example = tf.train.Example.FromString(data)
    encoded = example.features.feature["image/encoded"].bytes_list.value[0]
    read_header(encoded)
    with tf.device("/CPU:0"):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        pixels = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear")
    return pixels.numpy()


def decode_ab(records: list[bytes], *, repeats: int) -> dict:
    """ms per image (wall and CPU of this process): eager per record vs checks + batched decode."""
    dofn = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label",
                               id_key="image/filename", label_offset=0, num_classes=1000,
                               max_image_pixels=40_000_000, require_label=False)
    decoder = BatchImageDecoder((224, 224, 3))
    shard = [ShardRecord("bench.tfrecord", i, data) for i, data in enumerate(records)]

    def eager():
        for data in records:
            eager_decode_record(data)

    def batched():
        for start in range(0, len(shard), BATCH_SIZE):
            checked = [out for record in shard[start : start + BATCH_SIZE] for out in dofn.process(record)]
            decode_batch(decoder, checked)

    steps = {"eager_per_record": eager, "batched": batched}
    for step in steps.values():
        step()  # warm-up (first trace)
    wall = {key: [] for key in steps}
    cpu = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[key].append(1000.0 * (time.perf_counter() - t0) / len(records))
            cpu[key].append(1000.0 * (time.process_time() - c0) / len(records))
    return {key: {"wall_ms": median(wall[key]), "cpu_ms": median(cpu[key]), "wall_runs": wall[key],
                  "cpu_runs": cpu[key]} for key in steps} | {"images": len(records)}


def measure_feed(workdir: str, n: int, *, repeats: int, log=print) -> dict:
    """The feed table: tf.data vs the pipeline at 1 and 2 threads, and the decode A/B."""
    model_path = near_free_model(os.path.join(workdir, FEED_MODEL_NAME))
    data = {size: write_photo_shards(os.path.join(workdir, f"photos-{size}"), size, seed=3) for size in (n, 2 * n)}
    explainer = CamExplainer(load_keras_model(model_path), target_layer=FEED_TARGET_LAYER)
    tf_data_pass(data[n]["pattern"], explainer)  # warm-up: trace, thread pools, page cache
    # The input path alone: the sampled checks (faithfulness, sanity) are off here.
    layer = ("--target_layer", FEED_TARGET_LAYER, "--faithfulness_sample", "0", "--sanity_images", "0")
    configs = {"1 thread": layer, "2 threads": (*layer, *TWO_THREADS), "1 core": layer, NO_MODEL: layer,
               NO_DECODE: layer, NEITHER: layer, ONE_DECODER: layer}
    one_cpu = {min(os.sched_getaffinity(0))} if hasattr(os, "sched_getaffinity") else None
    runs: dict = {key: {n: [], 2 * n: []} for key in configs}
    # tf.data's passes, images/s and images per CPU-s: with the model, and without it (NO_MODEL's reference)
    passes: dict = {True: ([], []), False: ([], [])}
    lost: list = []
    for r in range(repeats):
        for _ in range(TF_DATA_PASSES):
            for with_model, (rates, cpu_rates) in passes.items():
                images, wall, cpu = tf_data_pass(data[2 * n]["pattern"], explainer if with_model else None)
                if images != 2 * n:
                    raise RuntimeError(f"tf.data read {images} images, expected {2 * n}")
                rates.append(images / wall)
                cpu_rates.append(images / cpu)
        for key, extra in configs.items():
            for size in (n, 2 * n):
                try:
                    result = run_pipeline_process(data[size]["pattern"], model_path,
                                                  os.path.join(workdir, f"feed-{key.replace(' ', '-')}-{size}-{r}"),
                                                  extra_args=extra, cpus=one_cpu if key == "1 core" else None,
                                                  levers=STUBS.get(key, ()))
                except RunawayMemory as exc:
                    # Seen once with Beam 2.77's multi_threading runner (24 GB at 1600 images, 1.2 GB in
                    # the same run repeated): say so and leave the run out of the rates.
                    lost.append({"config": key, "images": size, "explained": None, "reason": str(exc)[:200]})
                    log(f"  ! {key}, {size} images: {str(exc)[:120]}; run left out")
                    continue
                if result["images_explained"] != size:
                    # Beam 2.77's multi_threading FnApiRunner can drop an element (docs/design.md, "The input path and the GPU"):
                    # say so and leave the run out of the rates.
                    lost.append({"config": key, "images": size, "explained": result["images_explained"]})
                    log(f"  ! {key}, {size} images: {result['images_explained']} explained; run left out")
                    continue
                runs[key][size].append(result)
        log(f"  feed repeat {r + 1}/{repeats}: tf.data {', '.join(f'{v:.0f}' for v in passes[True][0][-TF_DATA_PASSES:])} img/s; "
            + ", ".join(f"P {key} {fmt(_steady(runs[key], n, -1), '.0f')}" for key in configs)
            + f" (load {os.getloadavg()[0]:.1f})")
    out: dict = {
        "images_n": n, "images_pair": 2 * n, "bytes_per_image": data[n]["bytes_per_image"], "lost_runs": lost,
        "image_size": data[n]["size"], "model": "Conv2D(8, 3x3, stride 2) + AveragePooling2D(16) (CAM here, 7x7) + GAP + Dense(1000), 224x224",
        "tf_data": _passes_summary(*passes[True]), "tf_data_no_model": _passes_summary(*passes[False]),
    }
    for key in configs:
        steady = [_steady(runs[key], n, r) for r in range(repeats)]
        kept = [v for v in steady if v is not None]
        busy = [b for b in (_cores_busy(runs[key], r) for r in range(repeats)) if b is not None]
        per_cpu = [v for v in (_steady_per_cpu(runs[key], n, r) for r in range(repeats)) if v is not None]
        out[key] = {"steady_runs": steady, "steady_median": median(kept) if kept else None,
                    "per_cpu_runs": per_cpu, "per_cpu_median": median(per_cpu) if per_cpu else None,
                    "cores_busy": median(busy) if busy else None,
                    "runs_n": runs[key][n], "runs_pair": runs[key][2 * n]}
    tf_rate = out["tf_data"]["best"]  # the reference: tf.data's best pass (see TF_DATA_PASSES)
    one, two = out["1 thread"]["steady_median"], out["2 threads"]["steady_median"]
    pinned = out["1 core"]["steady_median"]
    out["ratios"] = {"feed ratio": two / tf_rate if two else None, "feed ratio 1 thread": one / tf_rate if one else None,
                     "2-thread scaling": two / one if one and two else None,
                     "core scaling": one / pinned if one and pinned else None}
    bare_rate, bare_cpu = out["tf_data_no_model"]["best"], out["tf_data_no_model"]["cpu_median"]
    off, off_cpu = out[NO_MODEL]["steady_median"], out[NO_MODEL]["per_cpu_median"]
    out["ratios"]["feed ratio, model off the CPU"] = off / bare_rate if off else None
    out["ratios"]["feed ratio per CPU-s, model off the CPU"] = off_cpu / bare_cpu if off_cpu else None
    tf_cpu = out["tf_data"]["cpu_median"]
    for key, name in (("1 thread", "feed ratio per CPU-s (1 thread)"), ("2 threads", "feed ratio per CPU-s")):
        mine = out[key]["per_cpu_median"]
        out["ratios"][name] = mine / tf_cpu if mine and tf_cpu else None
    single = out[ONE_DECODER]["steady_median"]
    out["ratios"]["feed ratio 1 thread, one decode thread"] = single / tf_rate if single else None
    out["stages"] = stage_breakdown(out)
    out["targets"] = {key: {"value": out["ratios"][key], "target": f">= {minimum}",
                            "met": out["ratios"][key] is not None and out["ratios"][key] >= minimum}
                      for key, minimum in FEED_TARGETS.items()}

    shard = data[n]["pattern"].replace("*", "photos-00000-of-00004")
    with open(shard, "rb") as handle:
        records = list(iter_records(handle))
    records = (records * (4 * BATCH_SIZE // max(len(records), 1) + 1))[: 4 * BATCH_SIZE]
    out["decode_ab"] = decode_ab(records, repeats=repeats)
    ab = out["decode_ab"]
    log(f"  decode A/B: eager per record {ab['eager_per_record']['wall_ms']:.2f} ms/img "
        f"({ab['eager_per_record']['cpu_ms']:.2f} CPU-ms), batched {ab['batched']['wall_ms']:.2f} ms/img "
        f"({ab['batched']['cpu_ms']:.2f} CPU-ms)")
    return out


def stage_breakdown(out: dict) -> dict:
    """CPU-ms per image by stage, from the steady-state images per CPU-second of the 1-thread job with
    and without bench.levers' stubs: a stub's saving is its stage's cost."""
    def cpu_ms(key):
        rate = out.get(key, {}).get("per_cpu_median")
        return 1000.0 / rate if rate else None

    whole, no_model, no_decode, neither = (cpu_ms(k) for k in ("1 thread", NO_MODEL, NO_DECODE, NEITHER))
    if None in (whole, no_model, no_decode, neither):
        return {}
    stages = {"model step (CAM tf.function and its outputs)": whole - no_model,
              "batched decode and resize": whole - no_decode,
              "Beam and the job's Python (read, checks, rows, statistics, Parquet)": neither}
    stages["rest (what the stubs do not separate)"] = whole - sum(stages.values())
    tf_data = out["tf_data"]["cpu_median"]
    return {"whole": whole, "stages": stages, "tf_data": 1000.0 / tf_data if tf_data else None}


def _steady(pair: dict, n: int, r: int):
    try:
        small, large = pair[n][r], pair[2 * n][r]
    except IndexError:  # a run left out (lost_runs)
        return None
    delta = large["pipeline_seconds"] - small["pipeline_seconds"]
    return n / delta if delta > 0 else None


def _steady_per_cpu(pair: dict, n: int, r: int):
    """Images per CPU-second of the extra N images (2N run minus N run): the rate per core."""
    try:
        small, large = pair[n][r], pair[2 * n][r]
    except IndexError:
        return None
    if large.get("pipeline_cpu_seconds") is None or small.get("pipeline_cpu_seconds") is None:
        return None
    delta = large["pipeline_cpu_seconds"] - small["pipeline_cpu_seconds"]
    return n / delta if delta > 0 else None


def _passes_summary(rates: list, cpu_rates: list) -> dict:
    """tf.data's passes: images/s (runs, median, best) and per CPU-second, and the cores they kept busy."""
    busy = [w / c for w, c in zip(rates, cpu_rates, strict=True)]
    best = rates.index(max(rates))
    return {"runs": rates, "median": median(rates), "best": rates[best], "cpu_runs": cpu_rates,
            "cpu_median": median(cpu_rates), "cores_busy": median(busy), "best_cores_busy": busy[best]}


def _cores_busy(pair: dict, r: int):
    """CPU-seconds per second of the extra images' work (2N run minus N run): how many cores it kept busy."""
    try:
        small, large = pair[min(pair)][r], pair[max(pair)][r]
    except IndexError:
        return None
    delta = large["pipeline_seconds"] - small["pipeline_seconds"]
    if delta <= 0 or large.get("pipeline_cpu_seconds") is None or small.get("pipeline_cpu_seconds") is None:
        return None
    return (large["pipeline_cpu_seconds"] - small["pipeline_cpu_seconds"]) / delta


def feed_table(feed: dict) -> list[str]:
    """Lines of the feed section of the bench table."""
    ab = feed["decode_ab"]
    title = (f"Feed: near-free model, {feed['image_size']} photo-like JPEG shards "
             f"(~{feed['bytes_per_image'] / 1000:.0f} kB), images/s, steady state {feed['images_n']} -> "
             f"{feed['images_pair']} images")
    lines = [title]
    rows = [["tf.data best", "P 1 thread", "P 2 threads", "P 1 core", "feed ratio (2 threads)", "feed ratio (1 thread)",
             "2-thread scaling", "core scaling"],
            [(f'{fmt(feed["tf_data"].get("best", feed["tf_data"]["median"]))} '
              f'(median {fmt(feed["tf_data"]["median"])})'), fmt(feed["1 thread"]["steady_median"]),
             fmt(feed["2 threads"]["steady_median"]), fmt(feed["1 core"]["steady_median"]),
             fmt(feed["ratios"]["feed ratio"], ".2f"), fmt(feed["ratios"]["feed ratio 1 thread"], ".2f"),
             fmt(feed["ratios"]["2-thread scaling"], ".2f"), fmt(feed["ratios"]["core scaling"], ".2f")]]
    lines += grid(rows)
    busy = {name: feed[key].get("cores_busy") for name, key in
            (("tf.data (median)", "tf_data"), ("P 1 thread", "1 thread"), ("P 2 threads", "2 threads"),
             ("P 1 core", "1 core"))}
    busy = {"tf.data best": feed["tf_data"].get("best_cores_busy"), **busy}
    lines.append("Cores kept busy (CPU-s per wall-s; for P the steady part): "
                 + ", ".join(f"{name} {fmt(value, '.2f')}" for name, value in busy.items()))
    ratios = feed["ratios"]
    lines.append("Images per CPU-second (the same work per core, blind to idle cores and to tf.data's "
                 f"bimodal wall rate): tf.data {fmt(feed['tf_data']['cpu_median'])}, "
                 f"P 1 thread {fmt(feed['1 thread'].get('per_cpu_median'))}, "
                 f"P 2 threads {fmt(feed['2 threads'].get('per_cpu_median'))}: feed ratio per CPU-s "
                 f"{fmt(ratios.get('feed ratio per CPU-s (1 thread)'), '.2f')} (1 thread), "
                 f"{fmt(ratios.get('feed ratio per CPU-s'), '.2f')} (2 threads)")
    if NO_MODEL in feed:  # results written before this row existed have none
        bare, off = feed["tf_data_no_model"], feed[NO_MODEL]
        lines.append("Model off the CPU (what a GPU worker's cores do; P with bench.levers' null_model, tf.data "
                     f"without the model): tf.data best {fmt(bare['best'])} (median {fmt(bare['median'])}, "
                     f"{fmt(bare['cpu_median'])} per CPU-s), P 1 thread {fmt(off['steady_median'])} "
                     f"({fmt(off.get('per_cpu_median'))} per CPU-s): feed ratio "
                     f"{fmt(ratios.get('feed ratio, model off the CPU'), '.2f')}, per CPU-s "
                     f"{fmt(ratios.get('feed ratio per CPU-s, model off the CPU'), '.2f')}; cores busy "
                     f"tf.data {fmt(bare['cores_busy'], '.2f')}, P {fmt(off.get('cores_busy'), '.2f')}")
    if ONE_DECODER in feed:
        two, one = feed["1 thread"]["steady_median"], feed[ONE_DECODER]["steady_median"]
        lines.append(f"Decode threads (P 1 thread): two batches decoding at once {fmt(two)} img/s, one at a time "
                     f"(bench.levers' one_decode_thread) {fmt(one)}: "
                     f"feed ratio {fmt(ratios.get('feed ratio 1 thread'), '.2f')} vs "
                     f"{fmt(ratios.get('feed ratio 1 thread, one decode thread'), '.2f')}")
    if feed.get("stages"):
        st = feed["stages"]
        lines.append(f"CPU-ms per image by stage (1 thread, steady state; tf.data's whole pass "
                     f"{fmt(st['tf_data'], '.2f')}): whole job {st['whole']:.2f} = "
                     + " + ".join(f"{name} {ms:.2f}" for name, ms in st["stages"].items()))
    lines.append(f"Decode per image ({ab['images']} JPEGs, one caller thread): eager per record "
                 f"{ab['eager_per_record']['wall_ms']:.2f} ms ({ab['eager_per_record']['cpu_ms']:.2f} CPU-ms), "
                 f"checks + batched tf.function {ab['batched']['wall_ms']:.2f} ms "
                 f"({ab['batched']['cpu_ms']:.2f} CPU-ms)")
    return lines


def feed_rate_per_core(images: int = 4 * BATCH_SIZE, *, repeats: int = 3, size: int = 224) -> dict:
    """The input path's own rate on this machine: checks + batched decode of photo-like JPEGs.

    Images per CPU-second of this process (all of TensorFlow's threads
    counted) is the rate one core sustains; times the cores is what the
    worker's CPUs can feed a model, when nothing else runs on them.
    """
    pool = [encode_jpeg(image) for image in photo_images(min(images, 32), seed=9)]
    records = [ShardRecord("feed.tfrecord", i, make_example(pool[i % len(pool)], label=i % 1000))
               for i in range(images)]
    dofn = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label",
                               id_key="image/filename", label_offset=0, num_classes=1000,
                               max_image_pixels=40_000_000, require_label=False)
    decoder = BatchImageDecoder((size, size, 3))

    def step():
        for start in range(0, images, BATCH_SIZE):
            decode_batch(decoder, [out for r in records[start : start + BATCH_SIZE] for out in dofn.process(r)])

    step()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(images / (time.perf_counter() - t0))
        cpu.append(images / max(time.process_time() - c0, 1e-9))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_core = median(cpu)
    return {"per_core": per_core, "wall": median(wall), "cores": cores, "capacity": per_core * cores,
            "bytes_per_image": float(np.mean([len(p) for p in pool])), "image_size": "500x375",
            "what": "DecodeImageExamples checks + decode_batch (batches of 32) to 224x224x3"}


def bound(feed: dict, model_rate: float) -> str:
    """Which side limits the job: "feed" (input path) or "model", and the cores needed."""
    cores_needed = model_rate / feed["per_core"] if feed["per_core"] > 0 else float("inf")
    side = "feed" if feed["capacity"] < model_rate else "model"
    return f"{side} (the model needs {cores_needed:.1f} cores of input path; {feed['cores']} here)"
