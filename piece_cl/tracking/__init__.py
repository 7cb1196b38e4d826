"""Experiment tracking: what a run shows live in TensorBoard and/or W&B (docs/tracking.md).

run.py holds one `Tracker` and calls it once per optimiser step, once per stage and once at the end;
the tracker turns those into named scalars and images and hands them to the configured backends.
Nothing here feeds back into training or results.json.
"""
from piece_cl.tracking.tracker import Tracker, build_tracker

__all__ = ["Tracker", "build_tracker"]
