"""The ``qstar`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qstar",
        description="Quiet-STaR for any Hugging Face causal LM: train, evaluate, sweep, report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import bench

    p = sub.add_parser("bench", help="time a Quiet-STaR train step beside the plain LM step and the dense path",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"qstar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qstar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
