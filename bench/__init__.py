"""Benchmarks. `python -m bench` runs every part in one process run on one Postgres and prints a
markdown report (`--quick` for a smoke run, `--only PART` for one part); results are kept in
docs/benchmarks.md. `python -m bench.claim_throughput` is the older per-task cost breakdown.
"""
