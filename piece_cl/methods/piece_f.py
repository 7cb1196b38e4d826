"""PIECE-F: train only the top-k entries by empirical Fisher information (paper Eq. 4)."""
from piece_cl.methods.base import register_method
from piece_cl.methods.piece import Piece


@register_method
class PieceF(Piece):
    name = "piece_f"
    kind = "fisher"
