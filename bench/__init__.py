"""Benchmarks: measure Tickweave's per-task database cost beside a peer queue and pgbench.

Run with `python -m bench.claim_throughput` (`make bench`); results are kept in docs/benchmarks.md.
"""
