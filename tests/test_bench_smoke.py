"""Smoke tests of the benchmarks: they run end to end and write sane JSON.

Both scripts run in subprocesses (fresh TensorFlow state, Keras dtype policy
untouched here) in their smallest modes; the numbers are not judged, only
that every expected figure is there and positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str, timeout: float) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _run_json(tmp_path, module: str, *args: str, timeout: float) -> dict:
    """Runs a bench module with `--json` into tmp_path and returns what it wrote."""
    out = tmp_path / "bench.json"
    _run(module, *args, "--json", str(out), timeout=timeout)
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_run_bench_quick_writes_every_figure(tmp_path):
    results = _run_json(tmp_path, "bench.run_bench", "--quick", "--methods", "gradcam", "--formats", "jpeg",
                        "--skip", "feed,checks", timeout=400)
    assert results["meta"]["quick"] is True
    assert set(results["models"]) == {"mobilenet_v2"}
    m = results["models"]["mobilenet_v2"]
    assert _positive(m["forward"]["median"])
    assert _positive(m["cam"]["gradcam"]["median"])
    assert _positive(m["keras_io"]["median"])
    peer = m["tf_keras_vis"]
    assert _positive(peer.get("median")) or peer.get("error"), peer
    p = m["pipeline"]["jpeg"]
    # Wall-time differences can invert on a heavily shared machine; CPU seconds
    # of the 4N run always exceed those of the N run.
    assert _positive(p["steady_cpu_median"])
    assert isinstance(p["steady_median"], float)
    assert _positive(p["whole_run_seconds_n"])
    assert _positive(p["rss"]["maxrss_mb_n"]) and _positive(p["rss"]["maxrss_mb_big"])
    assert p["rss"]["images_big"] == 4 * p["images_n"]
    assert _positive(m["ratios"]["K/F gradcam"])
    for key in ("K/F gradcam", "P/F jpeg", "P/N jpeg"):
        assert _positive(m["cpu_ratios"][key]), key
    assert "P/F jpeg" in m["ratios"]
    # F measured beside each P repeat, and P/F the median of the per-repeat ratios
    assert len(p["forward_beside"]) == 1 and _positive(p["forward_beside"][0])
    assert p["pf_runs"][0] is None or math.isclose(p["pf_runs"][0], p["steady_runs"][0] / p["forward_beside"][0])
    assert m["ratios"]["P/F jpeg"] == p["pf_median"] or p["pf_median"] is None
    assert _positive(p["pf_cpu_median"]) and m["cpu_ratios"]["P/F jpeg"] == p["pf_cpu_median"]
    assert "measured beside it" in results["table"]
    assert {"K/F gradcam", "P/F jpeg", "RSS growth"} <= set(m["targets"])
    assert "K/F gradcam" in results["table"]


def test_run_bench_feed_part_writes_every_figure(tmp_path):
    results = _run_json(tmp_path, "bench.run_bench", "--quick", "--skip", "models,checks", "--feed_images", "32",
                        timeout=600)
    feed = results["feed"]
    assert feed["images_n"] == 32 and feed["image_size"] == "500x375"
    assert "core scaling" in results["table"] and "P 1 core" in results["table"]
    for key in ("1 thread", "1 core"):  # a run is left out only when it explained fewer images than it read
        assert len(feed[key]["runs_n"]) == 1 == len(feed[key]["runs_pair"])
    assert 20_000 < feed["bytes_per_image"] < 80_000
    assert _positive(feed["tf_data"]["median"])
    assert len(feed["tf_data"]["runs"]) == 2 and feed["tf_data"]["best"] == max(feed["tf_data"]["runs"])
    assert "tf.data best" in results["table"] and "feed ratio per CPU-s" in results["table"]
    # The model-off-the-CPU row: tf.data without the model, two passes a repeat; P with the null_model lever.
    assert len(feed["tf_data_no_model"]["runs"]) == 2 and _positive(feed["tf_data_no_model"]["best"])
    assert "Model off the CPU" in results["table"]
    for key in ("1 thread", "2 threads", "1 core", "1 thread, model off the CPU", "1 thread, one decode thread"):
        runs = feed[key]["runs_n"] + feed[key]["runs_pair"]
        assert all(r["records_rejected"] == {"decode": 0, "compute": 0} for r in runs)
        # At 32 -> 64 images the steady-state difference can be within the runs' noise: then None
        # (and the table prints "-"), never a made-up rate.
        assert feed[key]["steady_median"] is None or feed[key]["steady_median"] > 0
    for step in ("eager_per_record", "batched"):
        assert _positive(feed["decode_ab"][step]["cpu_ms"])
    # Where the CPU goes: the 1-thread job with the model, the decode and both stubbed; the stages add up.
    stages = feed["stages"]
    if stages:  # {} only when a steady rate could not be measured at 32 -> 64 images
        assert math.isclose(sum(stages["stages"].values()), stages["whole"], rel_tol=1e-9)
        assert "CPU-ms per image by stage" in results["table"]
    assert set(feed["targets"]) == {"feed ratio", "2-thread scaling"}
    assert set(feed["ratios"]) == {"feed ratio", "feed ratio 1 thread", "2-thread scaling", "core scaling",
                                   "feed ratio per CPU-s", "feed ratio per CPU-s (1 thread)",
                                   "feed ratio, model off the CPU", "feed ratio per CPU-s, model off the CPU",
                                   "feed ratio 1 thread, one decode thread"}
    assert "Decode threads (P 1 thread)" in results["table"]


def test_run_bench_checks_part_prices_each_check(tmp_path):
    results = _run_json(tmp_path, "bench.run_bench", "--quick", "--skip", "models,feed", "--checks_sizes", "16",
                        timeout=600)
    checks = results["checks"]
    assert checks["model"] == "mobilenet_v2"
    (entry,) = checks["results"]
    assert entry["images"] == 16
    assert set(entry["runs"]) == {"defaults", "faithfulness_off", "sanity_off", "both_off"}
    for name, runs in entry["runs"].items():
        assert len(runs) == 1 and _positive(runs[0]["wall"]) and _positive(runs[0]["cpu"]), name
        assert _positive(runs[0]["forward"]) and math.isclose(runs[0]["pf"], 16 / runs[0]["wall"] / runs[0]["forward"])
    for unit in ("wall", "cpu"):
        t = entry[unit]["seconds"]
        assert math.isclose(entry[unit]["faithfulness_seconds"], t["sanity_off"] - t["both_off"])
        assert math.isclose(entry[unit]["sanity_share"], (t["faithfulness_off"] - t["both_off"]) / t["defaults"])
    assert "The checks' cost" in results["table"] and "P/F defaults" in results["table"]
    assert "checks        faithfulness wall" in results["table"]


def test_vit_pointing_trains_audits_and_prints_both_models(tmp_path):
    result = _run_json(tmp_path, "bench.vit_pointing", "--seeds", "0", "--seconds", "2", "--images", "128",
                       "--test_images", "16", "--methods", "gradcam", "--layers", "final_norm,patch_embed",
                       timeout=600)
    assert 0 < result["summary"]["chance"] < 1
    layers = {run["model"]: run["methods"]["gradcam"]["target_layer"] for run in result["runs"]}
    # the ViT's default: its last block's output; the same ViT at the layers asked for, for comparison
    assert layers == {"vit": "block1_out", "vit_conv_stem": "block1_out", "cnn": "last_conv",
                      "vit at final_norm": "final_norm", "vit at patch_embed": "patch_embed"}
    for run in result["runs"]:
        for method, hit in run["methods"].items():
            assert hit["images"] == 16 and 0 <= hit["hits"] <= 16, (run["model"], method)


def test_gpu_check_runs_its_cpu_table_without_a_gpu(tmp_path):
    result = _run_json(tmp_path, "bench.gpu_check", "--quick", timeout=120)
    assert result["meta"]["device"] in ("CPU", "GPU")
    assert result["rows"]
    assert _positive(result["feed"]["per_core"]) and result["feed"]["cores"] >= 1
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["bound"].split()[0] in ("feed", "model")
        assert _positive(row["forward_ips"])
        assert all(_positive(v) for v in row["cam_ips"].values())


def test_a_run_past_the_memory_limit_is_stopped_not_left_to_the_oom_killer(tmp_path):
    """The bench stops a measured run whose RSS passes its limit (by its PID) and says so."""
    from bench.common import RunawayMemory, run_pipeline_process

    with pytest.raises(RunawayMemory, match="MB RSS"):
        run_pipeline_process(str(tmp_path / "none-*.tfrecord"), "no-model.keras", str(tmp_path / "out"),
                             max_rss_mb=1, timeout=120)
