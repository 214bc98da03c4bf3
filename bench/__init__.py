"""Benchmarks: each module runs with one command (`python -m bench.NAME`) and prints a table,
with its ceiling measured side by side in the same run. Figures go to bench/RESULTS.md."""
