"""The ``qstar`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(name: str | None) -> str | None:
    """A YAML path, or the name of a shipped config (``qstar/configs/NAME.yaml``)."""
    if name is None or Path(name).is_file():
        return name
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name} is neither a file nor a shipped config ({names})")


def _train(args: argparse.Namespace) -> int:
    import datetime as dt

    from .config import load_run_config
    from .train import format_summary, train

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `qstar train --resume --run-dir D key=value`
        config = None
    if config is None:
        if not (args.resume and args.run_dir and (Path(args.run_dir) / "config.yaml").is_file()):
            raise ValueError(
                "give a CONFIG (a YAML file or a shipped name such as smollm2_math), "
                "or --resume --run-dir DIR of an existing run"
            )
        config = str(Path(args.run_dir) / "config.yaml")
    path = resolve_config(config)
    cfg = load_run_config(path, overrides)
    run_dir = args.run_dir or str(
        Path("runs") / f"{Path(path).stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    )
    print(f"qstar: run directory {run_dir}", file=sys.stderr)
    summary = train(cfg, run_dir, resume=args.resume)
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qstar",
        description="Quiet-STaR for any Hugging Face causal LM: train, evaluate, sweep, report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train",
        help="train a Quiet-STaR model from a YAML config",
        description="Train (or resume) a Quiet-STaR run. Settings merge as defaults -> CONFIG -> "
        "key=value overrides (e.g. quiet_star.thought_len=5 optim.lr=1e-5); unknown keys fail. "
        "Shipped configs: " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) + ".",
    )
    p.add_argument(
        "config", nargs="?", help="YAML file or shipped config name (optional with --resume)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--run-dir", help="run directory (default: runs/CONFIG-TIMESTAMP)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint",
    )
    p.set_defaults(func=_train)

    from . import bench

    p = sub.add_parser(
        "bench",
        help="time a Quiet-STaR train step beside the plain LM step and the dense path",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train CFG --run-dir D a.b=c`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .loading import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ModelLoadError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"qstar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qstar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
