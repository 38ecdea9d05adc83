"""EfficientDet command line.

    python main.py -mode summary -model efficientdet-d0     # params and FLOPs (or -model all)
"""
from __future__ import annotations

import argparse
import sys

from model import VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EfficientDet D0-D7x, faithful to the official TF implementation.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-mode", required=True, choices=["summary"],
                        help="summary: parameter and FLOP counts of the variant(s)")
    parser.add_argument("-model", default="efficientdet-d0", choices=[*VARIANTS, "all"], help="variant")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "summary":
        from utils.summary import summary_table
        print(summary_table(list(VARIANTS) if args.model == "all" else [args.model]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
