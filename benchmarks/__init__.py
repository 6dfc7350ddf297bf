"""Benchmarks: scripts run as ``python -m benchmarks.bench_*``, their shared harness, and the GPU check."""
