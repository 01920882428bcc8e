"""Launcher-side steps (manifest counts, attention summary, report) hold memory independent of the rows.

The 1M / 10M-row figures come from `python -m bench.scale`; here a 50k-row
run folder (the job's schemas, synthesised by bench.scale) checks the mechanism:
the heatmaps are never read whole, only projected columns in record batches,
and the Python objects alive at the peak are a small fraction of what the
table would be as dicts.
"""

import sys
import tracemalloc

import pytest

from bench.scale import synthesize_run
from pipeline.report import page as report_module
from pipeline.runs import manifest as manifest_module

ROWS = 50_000


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("scale") / "run=big")
    truth = synthesize_run(run_dir, ROWS, chunk=5_000, rows_per_file=20_000)
    return run_dir, truth


@pytest.fixture
def no_whole_heatmaps(monkeypatch):
    """Any attempt to read the heatmaps table whole fails; batches of 4096 rows."""
    original = manifest_module.read_table

    def guarded(output, table, columns=None):
        assert table != "heatmaps", "the heatmaps table was read whole"
        return original(output, table, columns)

    for module in list(sys.modules.values()):  # every module that imported read_table by name (pipeline.report.page ...)
        if getattr(module, "read_table", None) is original:
            monkeypatch.setattr(module, "read_table", guarded)
    monkeypatch.setattr(manifest_module, "BATCH_ROWS", 4096)


def python_size_as_dicts(run_dir: str, sample: int = 1000) -> int:
    """Bytes the heatmaps would take as Python dicts (to_pylist), extrapolated from `sample` rows."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(manifest_module.table_files(run_dir, "heatmaps")[0]).read_row_group(0).slice(0, sample)
    tracemalloc.start()
    rows = table.to_pylist()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del rows
    return size * ROWS // sample


def test_counts_and_report_stay_small(big_run, no_whole_heatmaps):
    run_dir, truth = big_run
    as_dicts = python_size_as_dicts(run_dir)
    assert as_dicts > 100 * 2**20  # ~3 KB a row
    # Warm up: lazy imports, matplotlib's font cache.
    manifest_module.count_outputs(run_dir), manifest_module.attention_summary(run_dir)
    report_module.render_report(run_dir, manifest_module.load_manifest(run_dir))
    tracemalloc.start()
    counts = manifest_module.count_outputs(run_dir)
    attention = manifest_module.attention_summary(run_dir)
    counting_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    page = report_module.render_report(run_dir, manifest_module.load_manifest(run_dir))
    report_peak = tracemalloc.get_traced_memory()[1]  # mostly the plots and the page's own text
    tracemalloc.stop()
    assert counts == truth["counts"]
    assert attention == truth["attention"]
    assert f"Confidently wrong: {truth['flag_totals']['confident_wrong']} images" in page
    assert counting_peak < as_dicts / 1000, (counting_peak, as_dicts)  # measured ~11 kB
    assert report_peak < as_dicts / 10, (report_peak, as_dicts)  # measured 7-10 MB, none of it per row


def test_old_run_folders_count_flags_in_batches(big_run, no_whole_heatmaps, monkeypatch):
    """A run written before the exemplars table: flag totals from batched scans, no image grids."""
    run_dir, truth = big_run
    monkeypatch.setattr(report_module, "exemplars_by_kind", lambda _: None)
    assert report_module.flag_totals(run_dir) == truth["flag_totals"]
    page = report_module.render_report(run_dir, manifest_module.load_manifest(run_dir))
    assert "no exemplars table" in page and "data:image/jpeg" not in page
    assert f"Attention on the border: {truth['flag_totals']['attention_on_border']} images" in page


def test_scale_bench_steps_and_verdicts(big_run, tmp_path):
    """bench.scale's steps on a small folder (in-process), and its acceptance checks."""
    from bench.scale import measure_step, verdicts

    run_dir, truth = big_run
    baseline = str(tmp_path / "run=base")
    synthesize_run(baseline, 1_000, seed=1)
    got = measure_step("manifest", run_dir, baseline)
    assert got["counts"] == truth["counts"] and got["peak_rss_mb"] > 0
    assert measure_step("compare", run_dir, baseline)["exit_status"] in (0, 1)
    step = {"wall_seconds": 10.0, "peak_rss_mb": 300.0}
    runs = {"1000000": {"counts_match": True, "manifest": step, "compare": step, "report": step},
            "10000000": {"counts_match": True, "manifest": step, "compare": step,
                         "report": {"wall_seconds": 10.0, "peak_rss_mb": 400.0}}}
    assert verdicts(runs) == {"report_1M_seconds<=60": True, "report_1M_rss<=1.5GB": True,
                              "manifest_rss_10M/1M<=1.2": True, "compare_rss_10M/1M<=1.2": True,
                              "report_rss_10M/1M<=1.2": False, "counts_match": True}
