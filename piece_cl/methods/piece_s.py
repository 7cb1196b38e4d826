"""PIECE-S: train only the top-k entries by standardised mean shift |mean g| / sqrt(mean g² + ξ) (paper Eq. 10)."""
from piece_cl.methods.base import register_method
from piece_cl.methods.piece import Piece


@register_method
class PieceS(Piece):
    name = "piece_s"
    kind = "s"
