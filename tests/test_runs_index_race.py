"""Two processes finishing runs into one output at the same moment both stay in runs.json.

Two long-lived worker processes (multiprocessing, spawn) race through ROUNDS
rounds: in each they write their own run folder, meet at a barrier, and
call `pipeline.runs.history.update_index` together on a fresh output. Every
round's index must list both runs with each one's own entry. Locally and
on the GCS emulator (gs://).
"""

import multiprocessing

import pytest

from pipeline.runs.history import INDEX_NAME, index_entry, read_index, run_dir, update_index
from pipeline.runs.manifest import read_json, save_manifest

ROUNDS = 20
WORKERS = ("alpha", "beta")


def fake_manifest(output: str, run_id: str, round_no: int) -> dict:
    return {"run_id": run_id, "run_dir": run_dir(output, run_id), "state": "DONE",
            "started_at": f"round {round_no}", "finished_at": f"round {round_no}",
            "counts": {"records_read": round_no, "images_explained": round_no, "records_rejected": {}},
            "model": {"uri": "model.keras", "fingerprint": "sha256:x"}}


def race(root: str, run_id: str, barrier, emulator_host):
    """One worker: ROUNDS times, write the run folder, wait for the other, update the index."""
    import contextlib
    import os

    with contextlib.ExitStack() as stack:
        if emulator_host:
            from tests.infra.gcs_emulator import preseed_beam_credentials

            os.environ["STORAGE_EMULATOR_HOST"] = emulator_host
            stack.enter_context(preseed_beam_credentials())
        for round_no in range(ROUNDS):
            output = f"{root}/round-{round_no:02d}"
            manifest = fake_manifest(output, run_id, round_no)
            barrier.wait(timeout=120)
            save_manifest(manifest["run_dir"], manifest)  # as pipeline.finalize: the folder appears, then the index
            update_index(output, manifest)


def race_processes(root: str, emulator_host=None):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(WORKERS))
    workers = [context.Process(target=race, args=(root, run_id, barrier, emulator_host)) for run_id in WORKERS]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    assert [w.exitcode for w in workers] == [0, 0]


def assert_every_round_kept_both(root: str):
    for round_no in range(ROUNDS):
        output = f"{root}/round-{round_no:02d}"
        index = read_index(output)
        assert [r["run_id"] for r in index] == sorted(WORKERS), f"round {round_no}: {index}"
        for run_id in WORKERS:
            mine = [r for r in index if r["run_id"] == run_id][0]
            assert mine == index_entry(fake_manifest(output, run_id, round_no))
        assert read_json(f"{output}/{INDEX_NAME}")["runs"] == index


def test_concurrent_updates_keep_every_run_locally(tmp_path):
    race_processes(str(tmp_path))
    assert_every_round_kept_both(str(tmp_path))


def test_a_stale_entry_of_this_run_is_replaced(tmp_path):
    output = str(tmp_path)
    old = fake_manifest(output, "alpha", 1)
    save_manifest(old["run_dir"], old)
    update_index(output, old)
    new = fake_manifest(output, "alpha", 2)
    save_manifest(new["run_dir"], new)
    assert update_index(output, new) == [index_entry(new)]


@pytest.mark.cluster  # needs the GCS emulator (a subprocess, ~5 s)
def test_concurrent_updates_keep_every_run_on_gcs(tmp_path_factory):
    from tests.infra.gcs_emulator import GcsEmulator

    with GcsEmulator("race-test", log_dir=str(tmp_path_factory.mktemp("gcs-logs"))) as gcs:
        root = gcs.uri("races")
        race_processes(root, gcs.host)
        assert_every_round_kept_both(root)
