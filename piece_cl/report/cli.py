"""piece-report: Tables 1/2 and the paper's figures from piece-run output folders."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piece_cl.errors import PieceError
from piece_cl.report.tables import BWT_CONVENTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="piece-report",
        description="Regenerate the paper's tables and figures from runs, beside the paper's numbers.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders or sweep folders (searched for results.json)")
    parser.add_argument("--out", type=Path, default=Path("piece-report"), help="output folder (default: %(default)s)")
    parser.add_argument("--bwt", choices=sorted(BWT_CONVENTIONS), default="all",
                        help="all: after the last task (the paper's formula); authors: after task T-1, "
                             "as the paper's tables (default: %(default)s)")
    parser.add_argument("--no-paper", dest="paper", action="store_false", help="leave the paper's values out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from piece_cl.report.document import generate_report  # matplotlib only once the arguments are valid

    try:
        report = generate_report(args.runs, args.out, args.bwt, args.paper)
    except PieceError as exc:
        print(f"piece-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
