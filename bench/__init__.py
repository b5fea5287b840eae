"""fastblock benchmarks: `pytest bench/` (pytest-benchmark) and `python -m bench.report` (tables and plots)."""
