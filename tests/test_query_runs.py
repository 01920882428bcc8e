"""Runs queried together (issue 22, item 6): every table's run_id column, the schema version in the
Parquet metadata, the manifest and runs.json, docs/querying.md's DuckDB and pyarrow queries over three runs
(tests/audit_fixtures.py), and readers refusing a run of an unknown version in one line."""

from __future__ import annotations

import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import finalize
from pipeline.report import page as report
from pipeline.runs import compare, history
from pipeline.runs.manifest import MANIFEST_NAME, read_json, read_table, write_json
from tests.audit_fixtures import RUN_IDS
from transforms.errors import AuditError
from transforms.schemas import SCHEMA_VERSION, SCHEMA_VERSION_KEY
from transforms.tables import TABLES

QUERYING_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "querying.md")


def readme_block(name: str) -> str:
    """The fenced code between `<!-- name:begin -->` and `<!-- name:end -->` in docs/querying.md."""
    text = open(QUERYING_DOC, encoding="utf-8").read()
    block = re.search(rf"<!-- {name}:begin -->\s*```\w+\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert block, name
    return block.group(1)


def parquet_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))


def test_every_table_carries_the_run_id_and_the_version(demo_runs):
    index = {r["run_id"]: r for r in history.read_index(demo_runs.output)}
    for run_id in RUN_IDS:
        run = demo_runs.run_dir(run_id)
        for table in TABLES:
            files = parquet_files(os.path.join(run, table))
            assert files, (run_id, table)
            for path in files:
                parquet = pq.ParquetFile(path)
                assert parquet.schema_arrow.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
                field = parquet.schema_arrow.field("run_id")
                assert field.type == pa.string() and not field.nullable
            values = read_table(run, table, ["run_id"]).column("run_id")
            assert values.null_count == 0 and set(values.to_pylist()) <= {run_id}, (run_id, table)
        assert read_json(os.path.join(run, MANIFEST_NAME))["schema_version"] == SCHEMA_VERSION
        assert index[run_id]["schema_version"] == SCHEMA_VERSION
    comparison = pq.read_table(os.path.join(demo_runs.run_dir(RUN_IDS[1]), compare.COMPARISON_PARQUET))
    assert set(comparison.column("run_id").to_pylist()) == {RUN_IDS[1]}
    assert comparison.schema.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()


def expected_rows(output: str, run_ids) -> list[tuple]:
    rows = []
    for run_id in run_ids:
        stats = read_table(history.run_dir(output, run_id), "class_stats", ["class_id", "accuracy", "shortcut"])
        rows += [(run_id, r["class_id"], r["accuracy"], r["shortcut"]) for r in stats.to_pylist()]
    return sorted(rows, key=lambda r: (r[0], r[1]))


def old_run(source: str, output: str, run_id: str) -> None:
    """A copy of the run folder `source` as a run written before the schema version (no run_id, no version)."""
    target = history.run_dir(output, run_id)
    shutil.copytree(source, target)
    for path in parquet_files(os.path.join(target, "class_stats")):
        table = pq.read_table(path)
        table = table.drop_columns(["run_id"]).replace_schema_metadata(None)
        pq.write_table(table, path)


def test_readme_duckdb_query_reads_every_run(demo_runs, tmp_path):
    import duckdb  # the test extra installs it
    output = str(tmp_path / "out")
    for run_id in RUN_IDS:
        shutil.copytree(demo_runs.run_dir(run_id), history.run_dir(output, run_id))
    old_run(demo_runs.run_dir(RUN_IDS[0]), output, "2025-12-31")  # a run from before run_id and the version
    os.makedirs(f"{output}/{history.TEMP_PREFIX}2026-01-04-abc/class_stats")  # a run being written: not read
    shutil.copy(parquet_files(os.path.join(demo_runs.run_dir(RUN_IDS[0]), "class_stats"))[0],
                f"{output}/{history.TEMP_PREFIX}2026-01-04-abc/class_stats/part-0.parquet")
    sql = readme_block("query-runs").replace("/audits/classifier", output)
    result = duckdb.sql(sql)
    assert result.columns[:3] == ["run_id", "class_id", "class_name"]
    got = [(r[0], r[1], r[4], r[7]) for r in result.fetchall()]
    run_ids = ("2025-12-31", *RUN_IDS)
    want = expected_rows(output, run_ids)
    want = [("2025-12-31", *w[1:]) if w[0] == "2025-12-31" else w for w in want]
    assert got == want
    assert {r[0] for r in got} == set(run_ids)
    # the partition column and the files' run_id column side by side: same value, no clash
    both = duckdb.sql(f"SELECT DISTINCT run, run_id FROM read_parquet('{output}/run=2026-*/class_stats/*.parquet', "
                      "hive_partitioning = true, hive_types_autocast = false) ORDER BY run").fetchall()
    assert both == [(r, r) for r in RUN_IDS]
    # the shortcut flags across runs: the demo model flags triangle (class 2), the plain one does not
    flagged = {run_id: sorted(c for r, c, _, s in got if r == run_id and s) for run_id in RUN_IDS}
    assert flagged == {run_id: sorted(demo_runs.manifests[run_id]["attention"]["shortcut_classes"])
                       for run_id in RUN_IDS}
    assert 2 in flagged[RUN_IDS[0]] and 2 not in flagged[RUN_IDS[1]]


def test_readme_pyarrow_dataset_reads_every_run(demo_runs):
    scope: dict = {}
    code = readme_block("query-runs-pyarrow").replace('"/audits/classifier"', repr(demo_runs.output))
    exec(compile(code, "docs/querying.md", "exec"), scope)  # noqa: S102 - the doc's own snippet
    got = [(r["run_id"], r["class_id"], r["accuracy"], r["shortcut"]) for r in scope["stats"].to_pylist()]
    assert got == expected_rows(demo_runs.output, RUN_IDS)


def newer_run(demo_runs, tmp_path, version=99) -> str:
    """A copy of a run whose class_stats and manifest say a schema version this release does not know."""
    run = str(tmp_path / "out" / "run=2030-01-01")
    shutil.copytree(demo_runs.run_dir(RUN_IDS[0]), run)
    for path in parquet_files(os.path.join(run, "class_stats")):
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(version).encode()}), path)
    manifest = read_json(os.path.join(run, MANIFEST_NAME))
    write_json(os.path.join(run, MANIFEST_NAME), {**manifest, "schema_version": version, "run_id": "2030-01-01"})
    return run


def test_an_unknown_version_is_refused_in_one_line(demo_runs, tmp_path, capsys):
    run = newer_run(demo_runs, tmp_path)
    with pytest.raises(AuditError, match=r"schema version 99; this release of gradcam-audit reads versions 0, 1"):
        read_table(run, "class_stats")
    read_table(run, "heatmaps", ["run_id"])  # the other tables still say 1

    code = compare.main(["--baseline", demo_runs.run_dir(RUN_IDS[0]), "--current", run, "--no_write", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "schema version 99" in err, err

    assert report.main([run, "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema version 99" in err, err

    # python -m pipeline.finalize on it (its _finalize.json is the copied run's: give it this id)
    settings = read_json(os.path.join(run, finalize.SETTINGS_NAME))
    write_json(os.path.join(run, finalize.SETTINGS_NAME), {**settings, "run_id": "2030-01-01"})
    assert finalize.main(["--output", str(tmp_path / "out"), "--run_id", "2030-01-01", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema version 99" in err, err
    assert not os.path.exists(tmp_path / "out" / history.INDEX_NAME)


def test_version_zero_runs_still_read(demo_runs, tmp_path):
    output = str(tmp_path / "out")
    old_run(demo_runs.run_dir(RUN_IDS[0]), output, "2025-12-31")  # no version in the files, no run_id
    manifest_path = os.path.join(history.run_dir(output, "2025-12-31"), MANIFEST_NAME)
    manifest = read_json(manifest_path)
    manifest.pop("schema_version")
    write_json(manifest_path, manifest)
    before = compare.load_run(history.run_dir(output, "2025-12-31"), "baseline")
    after = compare.load_run(demo_runs.run_dir(RUN_IDS[0]), "current")
    result = compare.compare_runs(before, after)
    assert not result["flagged"]  # the same run, read across versions
