"""The ``qstar report``, ``qstar show`` and ``qstar generate`` sub-commands: a study's report,
and what a model thinks, on a text (an HTML page) or while it writes (streamed to the terminal). Heavy imports (torch, the model)
wait inside the handlers so that ``qstar --help`` stays quick."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DIM, RESET = "\033[2m", "\033[0m"


def add_parsers(sub) -> None:
    """Register ``report``, ``show`` and ``generate`` on the CLI's sub-parsers."""
    _add_report_parser(sub)
    _add_show_parser(sub)


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write report.md and the paper's figures for an experiment or run directory",
        description="Turn a sweep experiment (or one run directory) into OUT/report.md with figures "
        "(OUT/figures/, PNG and SVG), a results table and provenance, and OUT/data/: the data "
        "bundle, the compact copy of everything the report read (trials.json; per trial "
        "config.yaml, run.json, summary.json, metrics.jsonl, heldout/step_N.json.gz, "
        "tasks/step_N/*.jsonl and the cached model analyses; no weights), small enough to "
        "commit. `qstar report OUT/data` re-renders OUT/report.md and OUT/figures from the "
        "bundle alone, byte-identical, without loading a model. Re-running on the same "
        "directory reproduces the same files; `make reports` re-renders every committed report "
        "from its bundle.",
    )
    p.add_argument(
        "experiment",
        help="experiment directory (qstar sweep), run directory (qstar train), or a report's "
        "data bundle (REPORT_DIR/data)",
    )
    p.add_argument(
        "--out",
        help="output directory (default: reports/EXPERIMENT_NAME; for a data bundle, the "
        "report directory that holds it)",
    )
    p.add_argument(
        "--no-model",
        action="store_true",
        help="skip the analyses that load a trained model (the content control, where thinking "
        "helps, top thoughts)",
    )
    p.add_argument(
        "--reading",
        metavar="FILE",
        help="a Markdown file with a written interpretation, placed at the top under 'Reading'",
    )
    p.add_argument(
        "--with",
        dest="with_",
        action="append",
        default=[],
        metavar="EXPERIMENT",
        help="also report the trials of this experiment or report bundle (e.g. a "
        "baseline trained by another sweep on the same held-out windows); repeatable; the "
        "bundle keeps them",
    )
    p.add_argument(
        "--with-trials",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only the --with trials whose ids match this glob (e.g. 't001-*'); repeatable",
    )
    p.set_defaults(func=_report)


def _add_show_parser(sub) -> None:
    p = sub.add_parser(
        "show",
        help="write an HTML page of what a model thinks at each token of a text",
        description="Write one self-contained HTML page (no server, no network) and its JSON: "
        "each token coloured by the gain of thinking before it; a click shows that position's "
        "greedy and sampled thoughts with their rewards, the mixing weight, the top predictions "
        "with and without the thought, and the gain of a content-free pause thought.",
    )
    p.add_argument("model", help="a run directory (its final/), a saved model, hub id or GGUF")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to show")
    src.add_argument("--file", type=Path, help="a UTF-8 text file to show")
    src.add_argument(
        "--heldout", type=int, metavar="N", help="held-out window N of a run (its heldout.json)"
    )
    p.add_argument("--samples", type=int, default=3, help="sampled thoughts per position (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("thoughts"), help="output folder (thoughts/)")
    p.set_defaults(func=_show)

    g = sub.add_parser(
        "generate",
        help="generate text, thinking before each token, streamed",
        description="Generate a continuation of PROMPT token by token (KV-cached, thinking "
        "before every token), printing each token as it comes; --show-thoughts prints the "
        "thought before each token, dimmed, with its mixing weight.",
    )
    g.add_argument("model", help="a run directory, a saved model, hub id or GGUF")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--show-thoughts", action="store_true", help="print each token's thought")
    g.add_argument("--no-think", action="store_true", help="generate without thinking")
    g.add_argument(
        "--think-threshold", type=float, default=None, help="think only where the gate says"
    )
    g.set_defaults(func=_generate)


def _report(args: argparse.Namespace) -> int:
    from qstar.analysis.files import bundle_size  # with the report's modules: heavy
    from qstar.analysis.report import write_report  # pandas, matplotlib: heavy

    exp = Path(args.experiment)
    if args.out:
        out = Path(args.out)
    elif (exp / "bundle.json").is_file():  # a report's data bundle: re-render that report
        out = exp.resolve().parent
    else:
        out = Path("reports") / exp.resolve().name
    if args.with_trials and not args.with_:
        raise SystemExit("qstar report: --with-trials chooses among --with trials; add --with")
    report = write_report(
        exp,
        out,
        analyse_model=not args.no_model,
        reading=args.reading,
        with_=args.with_,
        with_trials=args.with_trials,
    )
    print(f"report: {report}")
    data = report.parent / "data"
    print(
        f"data bundle: {data} ({bundle_size(data) / 2**20:.2f} MiB; re-render: qstar report {data})"
    )
    return 0


def _load(name: str):
    from qstar.core.model import QuietStar  # torch: heavy; keeps qstar --help fast
    from qstar.evaluation.backend import resolve_model_path  # lm-eval: heavy

    path = resolve_model_path(name)
    return QuietStar.from_pretrained(path).eval(), path


def _show(args: argparse.Namespace) -> int:
    from qstar.analysis import viewer, viewer_page  # torch: heavy

    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    if args.heldout is not None:
        ids, source = _heldout_window(Path(args.model), args.heldout)
        qs, path = _load(args.model)
    else:
        text = args.text if args.text is not None else _read(args.file)
        if not text.strip():
            raise ValueError("the text to show is empty; pass --text, --file or --heldout N")
        qs, path = _load(args.model)
        ids = qs.tokenizer.encode(text, add_special_tokens=False)
        source = f"--file {args.file}" if args.file else "--text"
        if len(ids) < 2:
            raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    data = viewer.view_data(qs, ids, args.samples, args.seed, source=f"{path}, {source}")
    page = viewer_page.write_page(data, args.out, title=f"qstar show {args.model}")
    t = data["totals"]
    print(
        f"{page} ({t['tokens']} positions, mean gain {t['mean_gain']:+.4f} nats, thinking "
        f"helped {t['helped']}, hurt {t['hurt']}); data: {args.out / 'thoughts.json'}"
    )
    return 0


def _read(file: Path) -> str:
    if not file.is_file():
        raise FileNotFoundError(f"--file {file} does not exist")
    return file.read_text(encoding="utf-8")


def _heldout_window(run_dir: Path, n: int) -> tuple[list[int], str]:
    saved = run_dir / "heldout.json"
    if not saved.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no heldout.json: --heldout needs a run directory of qstar train"
        )
    windows = json.loads(saved.read_text())["windows"]
    if not 0 <= n < len(windows):
        raise ValueError(f"--heldout {n}: the run has {len(windows)} held-out windows")
    return windows[n], f"held-out window {n}"


def _generate(args: argparse.Namespace) -> int:
    import torch  # heavy; keeps qstar --help fast

    if args.no_think and args.think_threshold is not None:
        raise ValueError("--think-threshold with --no-think: the model would never think")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    qs, _ = _load(args.model)
    tok = qs.tokenizer
    ids = torch.tensor([tok.encode(args.prompt, add_special_tokens=False)])
    print(args.prompt, end="", flush=True)
    colour = sys.stdout.isatty()

    def on_token(info: dict) -> None:
        if args.show_thoughts and info["thoughts"] is not None:
            thought = [i for i in info["thoughts"][0].tolist() if i >= 0]
            if thought:
                note = f"[{tok.decode(thought)} | w {float(info['weights'][0]):+.3f}]"
                print(f"{DIM}{note}{RESET}" if colour else note, end="", flush=True)
        print(tok.decode(info["tokens"].tolist()), end="", flush=True)

    qs.generate(
        ids,
        max_new_tokens=args.max_tokens,
        think=not args.no_think,
        do_sample=args.temperature > 0,
        temperature=max(args.temperature, 1e-6),
        generator=torch.Generator().manual_seed(args.seed),
        think_threshold=args.think_threshold,
        on_token=on_token,
    )
    print()
    return 0
