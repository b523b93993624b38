"""ganops benchmarks: one bench_<op>.py per op, run by benchmarks/run.py."""
