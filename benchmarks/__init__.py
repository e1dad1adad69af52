"""Throughput and latency benchmarks of ironflow_celery against plain Celery.

    python -m benchmarks [--quick | --smoke] [--rows 1,2,...] [--output results.json]

See benchmarks/RESULTS.md for the table of a run, and `benchmarks.__main__` for how each
row is measured.
"""
