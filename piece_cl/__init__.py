"""piece_cl: reproduce PIECE (Parameter Importance-Driven Continual Learning) and its baselines."""

__version__ = "0.1.0"
