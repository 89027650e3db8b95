"""Benchmarks of drkl_kernels.

``pytest bench/ --benchmark-only``: pytest-benchmark microbenchmarks.
``python -m bench``: the report (table, JSON, plots; see bench/report.py).
``bash bench/gpu_report.sh OUT``: the whole GPU report in one command.
"""
