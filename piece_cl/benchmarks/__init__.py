"""Benchmarks: tasks, the metric each is scored by, and the general-ability probe, built from config.

The layer above `data/` (reads and encodes records) and `evaluation/` (generates, scores, executes).
"""
