"""Benchmark scripts; results go to ``benchmarks/results``."""
