"""Benchmarks: `python -m lsm.bench <name>`; each prints a table and writes JSON."""
