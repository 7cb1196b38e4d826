"""Hydra config tree, shipped inside the wheel as the package `piece_cl.configs`."""
