"""Benchmarks that print ratios measured side by side in one run.

    python -m bench.run_bench [--quick]   F / K / P / N / tf-keras-vis table
    python -m bench.gpu_check             the F / K table on a GPU (or a small CPU one)
"""
