"""Where the pipeline's time goes beside the model, and what the levers buy.

    python -m bench.levers [--model mobilenet_v2] [--images 256] [--json PATH]

Per-image costs measured in this process, each against the model's own
per-image time (1 / F):
  decode_dofn      `DecodeImageExamples.process` on serialized Examples (the
                   per-record checks: Example, features, header; no pixels)
  decode_batched   the same bytes decoded inside one tf.function per batch of 32
                   (tf.map_fn(decode_image), parallel iterations), the way
                   `transforms.decode.BatchImageDecoder` does in the handler
  format_rows      `FormatHeatmapRows` on the explaining step's batches (rows as
                   Arrow columns, flags; the attention statistics come with the batch)
  stack_batch      np.stack of 32 float32 224x224x3 images (`run_inference`)
  parquet_<codec>  pyarrow rows -> Parquet with snappy / zstd / none
and `apply_levers(names)`, used by `bench.pipeline_worker --lever NAME`, to
try a lever on a real pipeline run without editing the pipeline:
  tf_threads_2_1   tf.config.threading intra_op=2, inter_op=1
  tf_threads_1_2   intra_op=1, inter_op=2
  null_model       CamExplainer.__call__ returns made-up outputs of the right
                   shapes without running the model: what is left of a run is
                   the pipeline's own cost per image (read, decode, batch,
                   rows, Parquet, Beam), to hold against 1 / F
  null_decode      the batched decode returns zeros of the model's input
                   shape (sizes from the headers): with null_model, what is
                   left is the Python of the job per image
  one_decode_thread  `ExplainBatches` decodes one batch at a time (as before
                   2026-12-05): what the second decode thread buys
  no_exemplar_sources  no exemplar proposals (what the exemplar step costs)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def apply_levers(names) -> None:
    """Monkeypatches for one measured pipeline run (experiments only)."""
    import tensorflow as tf

    for name in names:
        if name.startswith("tf_threads_"):
            intra, inter = (int(x) for x in name[len("tf_threads_"):].split("_"))
            tf.config.threading.set_intra_op_parallelism_threads(intra)
            tf.config.threading.set_inter_op_parallelism_threads(inter)
        elif name == "null_model":
            from transforms.cam.explainer import CamExplainer

            def fake_call(self, images, labels=None):
                b = len(images)
                rng = np.random.default_rng(b)
                h, w = self.cam_shape
                return {
                    "predicted_class": np.zeros([b], np.int32),
                    "predicted_score": np.full([b], 0.5, np.float32),
                    "target_class": np.zeros([b, 1], np.int32),
                    "target_score": np.full([b, 1], 0.5, np.float32),
                    "target_logit": np.ones([b, 1], np.float32),
                    "cam": rng.random([b, 1, h, w], dtype=np.float32),
                    "finite": np.ones([b], bool),
                }

            CamExplainer.__call__ = fake_call
        elif name == "null_decode":
            from transforms import decode

            def fake_decode(decoder, items, failures):
                shape = getattr(decoder, "input_shape", None) or decoder.__self__.decoder.input_shape
                sizes = np.array([(item.image_height, item.image_width) for item in items], np.int32).reshape(-1, 2)
                return [(np.zeros([len(items), *shape], np.float32), sizes, list(items))]

            decode._decode_bisecting = fake_decode
        elif name == "one_decode_thread":
            from transforms import model_handler

            model_handler.DECODE_THREADS = 1
        elif name == "no_exemplar_sources":
            from transforms import exemplars

            exemplars.ToExemplarSources.process = lambda self, item: iter(())
        else:
            raise ValueError(f"unknown lever {name!r}")


CPU_MS: dict = {}  # the same measurements in CPU-ms of this process per item


def _per_item_ms(fn, items: int, repeats: int = 3, key: str | None = None) -> float:
    """Median wall ms per item; CPU ms per item go to CPU_MS[key]."""
    fn()  # warm up
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - started) * 1000.0 / items)
        cpu.append((time.process_time() - cpu_started) * 1000.0 / items)
    if key:
        CPU_MS[key] = float(np.median(cpu))
    return float(np.median(wall))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.levers")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "results", "levers.json"))
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.common import BATCH_SIZE, images_per_second, load_model, natural_images
    from pipeline.demo import encode, make_example
    from transforms.cam.explainer import CamExplainer
    from transforms.decode import BatchImageDecoder, DecodeImageExamples, decode_batch
    from transforms.heatmap_rows import FormatHeatmapRows
    from transforms.model_handler import CamWorker, KerasCamModelHandler
    from transforms.records import ShardRecord
    from transforms.schemas import HEATMAP_SCHEMA

    n = args.images
    pool = natural_images(64, seed=11)
    out: dict = {"model": args.model, "images": n}
    explainer = CamExplainer(load_model(args.model))
    batch = pool[:BATCH_SIZE].astype(np.float32)
    f_cpu: list = []
    k_cpu: list = []
    f_ips = images_per_second(lambda: explainer.forward(batch).numpy(), BATCH_SIZE, min_seconds=4, cpu=f_cpu)
    k_ips = images_per_second(lambda: explainer(batch), BATCH_SIZE, min_seconds=4, cpu=k_cpu)
    CPU_MS["forward"] = 1000.0 / f_cpu[0]
    CPU_MS["cam"] = 1000.0 / k_cpu[0]
    out["forward_ms_per_image"] = 1000.0 / f_ips
    out["cam_ms_per_image"] = 1000.0 / k_ips
    print(f"F {f_ips:.1f} img/s = {1000 / f_ips:.2f} ms/img; K {k_ips:.1f} img/s", flush=True)

    dofn = DecodeImageExamples(image_key="image/encoded", label_key="image/class/label",
                               id_key="image/filename", label_offset=0, num_classes=1000,
                               max_image_pixels=40_000_000, require_label=False)
    for fmt in ("jpeg", "png"):
        encoded = [encode(image, fmt) for image in pool]
        records = [ShardRecord("bench.tfrecord", i, make_example(encoded[i % len(encoded)], label=i % 1000,
                                                                 image_id=f"x{i}")) for i in range(n)]
        decoded = []

        def per_element(records=records, decoded=decoded):
            decoded.clear()
            for record in records:
                decoded.extend(dofn.process(record))

        out[f"decode_dofn_{fmt}_ms"] = _per_item_ms(per_element, n, key=f"decode_dofn_{fmt}")

        batch_decoder = BatchImageDecoder((224, 224, 3))
        chunks = [[encoded[(i + j) % len(encoded)] for j in range(BATCH_SIZE)] for i in range(0, n, BATCH_SIZE)]
        out[f"decode_batched_{fmt}_ms"] = _per_item_ms(
            lambda chunks=chunks, d=batch_decoder: [d(c) for c in chunks],
            len(chunks) * BATCH_SIZE, key=f"decode_batched_{fmt}")
        out[f"decode_bytes_{fmt}"] = float(np.mean([len(e) for e in encoded]))
        print(f"{fmt}: DoFn {out[f'decode_dofn_{fmt}_ms']:.2f} ms/img, batched tf.function "
              f"{out[f'decode_batched_{fmt}_ms']:.2f} ms/img", flush=True)

    worker = CamWorker(explainer, BatchImageDecoder(explainer.input_shape))
    _, items, _ = decode_batch(worker.decoder, decoded[:BATCH_SIZE])
    handler = KerasCamModelHandler(args.model)
    out["stack_batch_ms"] = _per_item_ms(lambda: np.stack([d.pixels for d in items]), BATCH_SIZE,
                                        key="stack_batch")
    # One explained batch as the explaining step emits it, formatted as often as n images take.
    one = handler.explain_batch(decoded[:BATCH_SIZE], handler.decode_images(decoded[:BATCH_SIZE], worker), worker)
    batches = [one] * max(1, n // max(1, len(one.images)))
    fmt_rows = FormatHeatmapRows(method="gradcam", target_layer=explainer.target_layer)
    rows: list = []  # Arrow batches of heatmap rows

    def format_all():
        rows.clear()
        for batch in batches:
            rows.extend(fmt_rows.process(batch))

    formatted = len(batches) * len(one.images)
    out["format_rows_ms"] = _per_item_ms(format_all, formatted, key="format_rows")
    for codec in ("snappy", "zstd", "none"):
        def write(codec=codec):
            table = pa.Table.from_batches(rows, schema=HEATMAP_SCHEMA)
            pq.write_table(table, io.BytesIO(), compression=codec)

        out[f"parquet_{codec}_ms"] = _per_item_ms(write, formatted, key=f"parquet_{codec}")
    print(f"stack {out['stack_batch_ms']:.3f} ms/img, rows {out['format_rows_ms']:.3f} ms/img, parquet "
          + ", ".join(f"{c} {out[f'parquet_{c}_ms']:.3f}" for c in ("snappy", "zstd", "none")) + " ms/img")

    for jit in (True,):
        try:
            e2 = CamExplainer(load_model(args.model), jit_compile=jit)
            out["forward_jit_ms_per_image"] = 1000.0 / images_per_second(
                lambda e2=e2: e2.forward(batch).numpy(), BATCH_SIZE, min_seconds=4)
            out["cam_jit_ms_per_image"] = 1000.0 / images_per_second(
                lambda e2=e2: e2(batch), BATCH_SIZE, min_seconds=4)
            print(f"jit_compile: F {out['forward_jit_ms_per_image']:.2f} ms/img, "
                  f"K {out['cam_jit_ms_per_image']:.2f} ms/img", flush=True)
        except Exception as exc:  # noqa: BLE001
            out["jit_error"] = str(exc).splitlines()[0][:300]
    for b in (16, 64):
        xb = natural_images(b, seed=12).astype(np.float32)
        out[f"forward_batch{b}_ms_per_image"] = 1000.0 / images_per_second(
            lambda xb=xb: explainer.forward(xb).numpy(), b, min_seconds=3)
        out[f"cam_batch{b}_ms_per_image"] = 1000.0 / images_per_second(
            lambda xb=xb: explainer(xb), b, min_seconds=3)
    out["cpu_ms_per_item"] = CPU_MS
    out["load_average_1min"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(out, handle, indent=2)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
