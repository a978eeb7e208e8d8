"""The ``qstar`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from qstar import cli_tools
from qstar.config import quiet_star_overrides
from qstar.errors import RunFailed
from qstar.run_config import (  # resolve_config: also re-exported for callers
    CONFIG_DIR,
    load_run_config,
    resolve_config,
)
from qstar.runs.tracking import STATUS_ERROR, STATUS_PENDING, STATUS_STOPPED


def _bench(args: argparse.Namespace) -> int:
    from qstar.analysis import bench  # torch: heavy; not loaded by a bare import of qstar.cli

    return bench.main(args)


def _train(args: argparse.Namespace) -> int:
    import datetime as dt

    from qstar.recipes.train import format_summary, train  # torch, lm_eval: heavy

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
    if os.environ.get("RANK", "0") == "0":
        print(f"qstar: run directory {run_dir}", file=sys.stderr)
    summary = train(cfg, run_dir, resume=args.resume)
    if summary:  # the main process of a data-parallel run
        print(format_summary(cfg, summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qstar.evaluation import backend as ev  # lm_eval, torch: heavy
    from qstar.evaluation import results as evres  # lm_eval (the package): heavy

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks needs at least one task name")
    modes = {"think": [True], "no-think": [False], "both": [True, False]}[args.mode]
    if args.think_threshold is not None and args.mode == "no-think":
        raise ValueError(
            "--think-threshold chooses where the model thinks; with --no-think it never does: "
            "drop one of them"
        )
    overrides = quiet_star_overrides(args.overrides)  # a typo fails before anything loads
    ev.resolve_tasks(
        tasks, args.include_path, args.data_dir
    )  # bad names fail before the model loads
    lm = ev.QStarLM(
        pretrained=args.model,
        overrides=overrides,
        thought_len=args.thought_len,
        greedy_thoughts=not args.sample_thoughts,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        think_threshold=args.think_threshold,
    )
    runs, payload = {}, {"runs": {}}
    for think in modes:
        lm.think = think
        label = "think" if think else "no-think"
        limit = f" (limit {args.limit})" if args.limit else ""
        print(f"qstar eval: {label} on {', '.join(tasks)}{limit}", file=sys.stderr)
        results = ev.evaluate(
            lm, tasks, args.limit, args.include_path, args.data_dir, args.seed, args.log_samples
        )
        runs[label] = evres.metric_table(results)
        payload["runs"][label] = {
            key: results.get(key)
            for key in ("results", "versions", "n-samples", "configs", "timing", "samples")
        }
        timing = results["timing"]
        print(
            f"qstar eval: {label}: {timing['examples']} examples in {timing['seconds']:.1f} s "
            f"({timing['examples_per_s'] or 0:.2f} examples/s)",
            file=sys.stderr,
        )
        counts = lm.gate_counts
        if think and args.think_threshold is not None and counts["positions"]:
            share = counts["thought"] / counts["positions"]
            payload["runs"][label]["gate"] = dict(counts, fraction=share)
            print(
                f"qstar eval: the gate let {counts['thought']} of {counts['positions']} "
                f"positions think ({share:.1%}) at threshold {args.think_threshold}",
                file=sys.stderr,
            )
    payload["provenance"] = evres.provenance_block(args.model, lm, tasks, results)
    payload["provenance"].update(
        limit=args.limit, include_paths=args.include_path, data_dir=args.data_dir
    )
    payload["table"] = runs
    path = evres.write_results(Path(args.output), payload)
    print(evres.format_table(runs))
    print(f"results: {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from qstar.experiments.sweep import describe, load_sweep, preflight  # lm_eval: heavy

    sweep = load_sweep(args.file, smoke=args.smoke)
    if args.name:
        sweep.name = args.name
    if args.dry_run:
        print(describe(sweep))
        return 0
    from qstar.experiments import tune_adapter  # Ray's side, lm_eval: heavy; not for --dry-run

    problems = preflight(sweep)  # before Ray starts and before anything is written
    if problems:
        for line in problems:
            print(f"qstar sweep: error: {line}", file=sys.stderr)
        return 2
    storage = Path(args.storage)
    print(f"qstar sweep: {len(sweep.trials)} trials -> {storage / sweep.name}", file=sys.stderr)
    unfinished, failed = [], []
    try:
        tune_adapter.run_sweep(
            sweep,
            storage,
            address=args.address,
            resume=args.resume,
            retry_failed=args.retry_failed,
            verbose=args.verbose,
        )
    finally:
        exp_dir = storage / sweep.name
        if (exp_dir / "trials.json").is_file():
            summary = tune_adapter.write_summary(exp_dir)
            print(summary.read_text())
            with summary.open() as fh:
                rows = list(csv.DictReader(fh))
            unfinished = [
                r["trial_id"] for r in rows if r["status"] in (STATUS_PENDING, STATUS_STOPPED)
            ]
            failed = [
                (r["trial_id"], r.get("error") or "") for r in rows if r["status"] == STATUS_ERROR
            ]
            print(
                f"experiment: {exp_dir}  (resume: qstar sweep {args.file}"
                f"{' --smoke' if args.smoke else ''} --resume{' --name ' + args.name if args.name else ''})"
            )
    if (
        unfinished and sweep.scheduler is None
    ):  # with ASHA, stopped trials are the scheduler's doing
        print(
            f"qstar sweep: interrupted with {len(unfinished)} unfinished trial(s); continue with --resume",
            file=sys.stderr,
        )
        return 130
    if failed:
        for trial_id, error in failed:
            print(f"qstar sweep: trial {trial_id} failed: {error}", file=sys.stderr)
        print(
            f"qstar sweep: {len(failed)} of {len(sweep.trials)} trial(s) failed; see trials/ID/error.txt",
            file=sys.stderr,
        )
        return 1
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
        description="Train (or resume) a Quiet-STaR run, or with train.method=star|trice|vstar "
        "one of the STaR family on question-answer data. Settings merge as defaults -> CONFIG -> "
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

    p = sub.add_parser(
        "eval",
        help="evaluate with lm-evaluation-harness tasks, thinking at every token",
        description="Score a model on lm-eval tasks with the qstar backend. Tasks: the paper protocol "
        "(qstar_gsm8k_paper, qstar_csqa_paper and their *_local variants), chain of thought with a "
        "majority vote (qstar_gsm8k_cot_maj8, qstar_csqa_cot_maj8, *_local), stock lm-eval tasks "
        "(gsm8k, commonsense_qa, and gsm8k_local / commonsense_qa_local reading local files), "
        "and any YAML task in an --include-path directory.",
    )
    p.add_argument(
        "--model",
        default="HuggingFaceTB/SmolLM2-135M",
        help="hub id, directory, .gguf file, qstar run directory or saved QuietStar (default: SmolLM2-135M)",
    )
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="extra directory of task YAML files (repeatable)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with local data (gsm8k/, csqa/) for the *_local tasks (default: $QSTAR_DATA_DIR)",
    )
    p.add_argument(
        "--output",
        default="eval_results",
        help="directory for the results JSON (default: eval_results)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--think",
        dest="mode",
        action="store_const",
        const="think",
        help="think at every token (default)",
    )
    group.add_argument(
        "--no-think",
        dest="mode",
        action="store_const",
        const="no-think",
        help="score the base model",
    )
    group.add_argument(
        "--both",
        dest="mode",
        action="store_const",
        const="both",
        help="score with and without thinking in one call and print the difference",
    )
    p.set_defaults(mode="think")
    p.add_argument(
        "--thought-len",
        type=int,
        default=None,
        help="thought tokens at inference (default: the model's); "
        "the same as quiet_star.thought_len=N",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="quiet_star.KEY=VALUE",
        help="inference settings in qstar train's grammar, e.g. quiet_star.thought_len=8 "
        "quiet_star.attention=dense",
    )
    p.add_argument(
        "--sample-thoughts", action="store_true", help="sample thoughts (seeded) instead of greedy"
    )
    p.add_argument(
        "--think-threshold",
        type=float,
        default=None,
        help="think only where the model's gate (quiet_star.gate) predicts a gain of at least "
        "this many nats; prints the fraction of positions that thought",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--log-samples", action="store_true", help="keep per-example outputs in the results file"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "sweep",
        help="run an ablation sweep of training runs on Ray Tune",
        description="Expand a sweep file (a base config plus a search space) into trials and run each as a "
        "`qstar train` run on Ray Tune: locally (an embedded Ray instance) or on a cluster (--address). "
        "Interrupt with Ctrl-C at any time; --resume continues unfinished trials from their checkpoints.",
    )
    p.add_argument("file", help="sweep YAML (e.g. sweeps/smoke.yaml)")
    p.add_argument(
        "--smoke", action="store_true", help="apply the file's smoke: section (a small, fast form)"
    )
    p.add_argument("--name", help="experiment name (default: the sweep's name)")
    p.add_argument(
        "--storage", default="experiments", help="where experiments live (default: experiments)"
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument(
        "--retry-failed", action="store_true", help="with --resume, also rerun failed trials"
    )
    p.add_argument("--dry-run", action="store_true", help="print the expanded trials and exit")
    p.add_argument("--verbose", type=int, default=1, help="Ray Tune verbosity 0-3 (default: 1)")
    p.set_defaults(func=_sweep)

    from qstar.analysis import bench  # torch: heavy; not loaded by a bare import of qstar.cli

    p = sub.add_parser(
        "bench",
        help="time a Quiet-STaR train step beside the plain LM step and the dense path",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(func=_bench)
    cli_tools.add_parsers(sub)  # qstar show, qstar generate
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train CFG --run-dir D a.b=c`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from qstar.models.loading import ModelLoadError  # torch: heavy; keeps qstar --help fast

    try:
        return int(args.func(args) or 0)
    except RunFailed as exc:  # a run that failed (diverged, disk full), not a bad input
        print(f"qstar {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ModelLoadError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"qstar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qstar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
