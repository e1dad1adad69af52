"""Benchmark row 10: the drain and cycle workloads on ironflow_celery and on four peers.

Each peer lives in its own module (``procrastinate_peer``, ``pgqueuer_peer``, ``dbos_peer``,
``outbox_peer``; ironflow_celery itself in ``ironflow_peer``), with two functions,
``drain(run, n)`` and ``cycle(run, n)``, each returning a `common.Measure`. `common.row10`
runs them in interleaved rounds, each peer in a fresh database of its own that is dropped
afterwards, with its worker processes started as subprocesses and stopped by PID.

The peers come from the optional extra ``bench`` (``pip install -e .[bench]``, which
``python3 dev.py bench`` does); a peer that is missing or fails is reported as an error in its
cell, never dropped.
"""
