"""The memory plan: predicted peak memory per rank of each phase of a run, before any weights load.

`piece-plan` (plan/cli.py) composes the same config as `piece-run`, builds the model on the meta
device at its real shapes (plan/shapes.py), counts the tensors autograd would save by running the
real forward there (plan/activations.py), and adds the state each method and engine keeps
(plan/memory.py), with constants calibrated by scripts/bench_memory.py (plan/calibration.py).
"""
