"""Train-step benchmark: the sparse thought path beside the plain LM step and the dense-mask path.

For each (model, L, thought_len, n_true) the three steps are timed interleaved in one process
(these machines are noisy, so only ratios measured side by side are reported):

* ``plain``: one forward+backward of the base LM on the same batch repeated ``k`` times;
* ``fast``:  a Quiet-STaR step with ``attention="sparse"``;
* ``dense``: the same step with the authors' dense additive masks, one depth per call.

``passes = thought_len + 2 + n_true`` model passes per step, so ``passes x plain`` is about the
floor for a Quiet-STaR step. Activation memory is the bytes autograd saves for backward
(distinct storages, via ``saved_tensors_hooks``), which works on every device; on CUDA the
peak allocated memory is reported too.

``--memory`` measures instead how activation memory grows with thought length at a fixed
lookahead: the saved bytes of one forward of the fast and the dense path for thought lengths
1..24, and the growth exponent of each (the slope of log bytes against log passes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qstar.analysis import bench_eval
from qstar.analysis.bench_memory import (  # noqa: F401  (re-exported)
    dense_attention_bytes,
    fmt,
    memory_growth,
    peak_rss_increase,
    saved_activation_bytes,
    wrap_model,
)
from qstar.analysis.bench_step import (  # noqa: F401  (the timing loop, re-exported)
    DEFAULT_CONFIGS,
    PEAK_TFLOPS,
    _dense_step,
    _plain_step,
    _print_row,
    _qstar_step,
    _rss_columns,
    _sync,
    _time,
    _unfused_step,
    markdown,
    peak_flops,
    run,
)
from qstar.config import quiet_star_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        default="tiny,small",
        help="comma list of: tiny, small (random Mistral-shaped models), default (the default "
        "model, SmolLM2-135M, with its tokenizer) (default: tiny,small)",
    )
    p.add_argument(
        "--lengths", default="128,256", help="comma list of sequence lengths (default: 128,256)"
    )
    p.add_argument(
        "--configs",
        default="5:4,9:4,13:8,21:12",
        help="comma list of thought_len:n_true (default: 5:4,9:4,13:8,21:12)",
    )
    p.add_argument("--k", type=int, default=2, help="thoughts per position (default: 2)")
    p.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default: 1; --eval: 8)"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per step (default: 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-dense", action="store_true", help="do not time the dense-mask path")
    p.add_argument(
        "--fused-ce",
        default="chunked",
        choices=["off", "chunked"],
        help="the Quiet-STaR step's log-probabilities, as train.fused_ce (default: chunked; "
        "with chunked the unfused step is timed beside it)",
    )
    p.add_argument(
        "--no-rss",
        action="store_true",
        help="skip the peak-RSS columns (each is a fresh process: a few seconds per configuration)",
    )
    p.add_argument(
        "--dense-limit-gb",
        type=float,
        default=6.0,
        help="skip the dense path where its attention would keep more than this (default: 6)",
    )
    p.add_argument(
        "--think-fraction",
        type=float,
        default=None,
        help="also time the step that thinks at this fraction of positions (think_at: hardest) "
        "beside the all-positions step",
    )
    p.add_argument(
        "--think-threshold",
        type=float,
        default=None,
        help="with --generate and a model with a gate: also time gated thinking generation",
    )
    p.add_argument("--out", type=Path, default=None, help="write bench.json and bench.md here")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="quiet_star.KEY=VALUE",
        help="method settings for every benchmarked config, in qstar train's grammar (e.g. "
        "quiet_star.n_thoughts=4 quiet_star.mixing=logprob); thought_len and n_true come from "
        "--configs, and --k is the same as quiet_star.n_thoughts",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="instead: held-out scoring through the fused head against materialised logits "
        "(seconds and peak RSS of each); writes eval.md/json to --out",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="instead: tokens/s of thinking generation against plain generation on --model "
        "(default: the default model) at its thought length (default 9), and 8 sampled answers "
        "from one shared prefill against the prompt repeated; writes generation.json to --out",
    )
    p.add_argument(
        "--rationales",
        action="store_true",
        help="instead: rationales/s of the STaR family's batched sampler against "
        "transformers.generate on the same 16 few-shot GSM8K prompts of --model; writes "
        "rationales.json to --out",
    )
    p.add_argument(
        "--model", default=None, help="with --generate/--rationales: model id, directory or .gguf"
    )
    p.add_argument(
        "--thought-len", type=int, default=9, help="with --generate: thought length (default: 9)"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: activation memory against thought length (1..24, n_true 4) on the first "
        "of --sizes and --lengths; writes memory.md/json/png to --out",
    )


def main(args: argparse.Namespace) -> int:
    try:
        configs = tuple(tuple(int(x) for x in c.split(":")) for c in args.configs.split(","))
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        print(
            "qstar bench: error: --configs is like 5:4,9:4 and --lengths like 128,256",
            file=sys.stderr,
        )
        return 2
    overrides = quiet_star_overrides(getattr(args, "overrides", []))
    fixed = sorted({"thought_len", "n_true"} & set(overrides))
    if fixed:
        print(
            f"qstar bench: error: quiet_star.{fixed[0]} comes from --configs (thought_len:n_true)",
            file=sys.stderr,
        )
        return 2
    common = dict(
        k=overrides.pop("n_thoughts", args.k),
        overrides=overrides,
        device=args.device,
        dtype=args.dtype,
        dense_limit_gb=args.dense_limit_gb,
        out=args.out,
    )
    if args.rationales:
        bench_eval.rationale_generation(model=args.model, repeats=args.repeats, out=args.out)
        return 0
    if args.generate:
        bench_eval.generation(
            model=args.model,
            thought_len=args.thought_len,
            repeats=args.repeats,
            out=args.out,
            think_threshold=args.think_threshold,
        )
        return 0
    if args.eval:
        bench_eval.run(
            sizes=tuple(args.sizes.split(",")),
            lengths=lengths,
            batch=args.batch or 8,
            repeats=args.repeats,
            rss=not args.no_rss,
            out=args.out,
        )
        return 0
    if args.memory:
        memory_growth(size=args.sizes.split(",")[0], L=lengths[0], **common)
        return 0
    run(
        sizes=tuple(args.sizes.split(",")),
        lengths=lengths,
        configs=configs,
        batch=args.batch or 1,
        repeats=args.repeats,
        skip_dense=args.skip_dense,
        rss=not args.no_rss,
        fused_ce=args.fused_ce,
        think_fraction=args.think_fraction,
        **common,
    )
    return 0
