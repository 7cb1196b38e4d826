"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class PieceError(Exception):
    """An error caused by the user's input or environment, explained in one line."""
