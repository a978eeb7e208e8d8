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
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qstar.analysis.bench_memory import (
    dense_attention_bytes,
    fmt,
    memory_growth,
    peak_rss_increase,
    saved_activation_bytes,
    wrap_model,
)
from qstar.config import QuietStarConfig
from qstar.models.random import mistral_shaped, tiny_tokenizer

DEFAULT_CONFIGS = ((5, 4), (9, 4), (13, 8), (21, 12))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _plain_step(model, ids: torch.Tensor) -> None:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def _qstar_step(qs, ids: torch.Tensor, gen: torch.Generator) -> None:
    qs(ids, generator=gen).loss.backward()


def run(
    sizes=("tiny", "small"),
    lengths=(128, 256),
    configs=DEFAULT_CONFIGS,
    k: int = 2,
    batch: int = 1,
    repeats: int = 2,
    device: str | None = None,
    dtype: str = "float32",
    dense_limit_gb: float = 6.0,
    skip_dense: bool = False,
    out: Path | None = None,
    overrides: dict | None = None,
    rss: bool = True,
    fused_ce: str = "chunked",
) -> list[dict]:
    """The benchmark table (see the module docstring). ``rss``: also measure each step's peak
    resident-memory increase in a fresh process (CPU only; a few seconds per configuration)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = tiny_tokenizer()
    rows = []
    header = (
        f"{'model':6} {'L':>4} {'t,n':>6} {'passes':>6} {'plain s':>8} {'fast s':>8} "
        f"{'fast/(p*plain)':>14} {'dense s':>8} {'dense/fast':>10} "
        f"{'act MB plain':>12} {'act MB fast':>11} {'act MB dense':>12} "
        f"{'RSS MB plain':>12} {'RSS MB fast':>11}"
    )
    print(
        f"# device={dev} dtype={dtype} k={k} batch={batch} repeats={repeats} torch={torch.__version__}"
    )
    print(header)
    for size in sizes:
        model = mistral_shaped(size, dtype=torch_dtype).to(dev)
        model.train()
        mcfg = model.config
        for L in lengths:
            gen_ids = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 32000, (batch, L), generator=gen_ids).to(dev)
            ids_k = ids.repeat_interleave(k, 0)
            for t, n in configs:
                qcfg = QuietStarConfig(thought_len=t, n_true=n, n_thoughts=k).replace(
                    **(overrides or {})
                )
                passes = qcfg.passes
                qs = wrap_model(model, tok, qcfg, fused_ce).to(dev)
                gen = torch.Generator().manual_seed(0)
                steps = {
                    "plain": functools.partial(_plain_step, model, ids_k),
                    "fast": functools.partial(_qstar_step, qs, ids, gen),
                }
                dense_bytes = dense_attention_bytes(
                    qcfg, L, mcfg.num_attention_heads, mcfg.num_hidden_layers, batch * k
                )
                if not skip_dense and dense_bytes < dense_limit_gb * 2**30:
                    steps["dense"] = functools.partial(_dense_step, qs, ids, gen)
                if fused_ce != "off":  # the same step with logits materialised, side by side
                    steps["unfused"] = functools.partial(_unfused_step, qs, ids, gen)
                res = {name: {"times": [], "saved": 0, "peak": 0} for name in steps}
                for name, fn in steps.items():  # warm-up run, which also measures memory
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    with saved_activation_bytes() as acc:
                        fn()
                    res[name]["saved"] = acc["bytes"]
                    if dev.type == "cuda":
                        res[name]["peak"] = torch.cuda.max_memory_allocated()
                    qs.zero_grad(set_to_none=True)
                for _ in range(repeats):  # interleaved: plain, fast, dense, plain, ...
                    for name, fn in steps.items():
                        res[name]["times"].append(_time(fn, dev))
                        qs.zero_grad(set_to_none=True)
                med = {name: statistics.median(v["times"]) for name, v in res.items()}
                n_params = sum(p.numel() for p in model.parameters())
                token_passes = (
                    batch * k * L * passes
                )  # every thought and true token: forward + backward
                peak = peak_flops(dev, torch_dtype)
                row = {
                    "params_m": n_params / 1e6,
                    "fast_tokens_per_s": batch * L / med["fast"],
                    "fast_mfu": 6 * n_params * token_passes / med["fast"] / peak if peak else None,
                    "plain_mfu": 6 * n_params * batch * k * L / med["plain"] / peak
                    if peak
                    else None,
                    "model": size,
                    "L": L,
                    "thought_len": t,
                    "n_true": n,
                    "k": k,
                    "batch": batch,
                    "passes": passes,
                    "plain_s": med["plain"],
                    "fast_s": med["fast"],
                    "fast_over_passes_plain": med["fast"] / (passes * med["plain"]),
                    "dense_s": med.get("dense"),
                    "dense_over_fast": med["dense"] / med["fast"] if "dense" in med else None,
                    "act_mb_plain": res["plain"]["saved"] / 2**20,
                    "act_mb_fast": res["fast"]["saved"] / 2**20,
                    "act_mb_dense": res["dense"]["saved"] / 2**20 if "dense" in res else None,
                    "unfused_s": med.get("unfused"),
                    "unfused_over_fast": med["unfused"] / med["fast"] if "unfused" in med else None,
                    "act_mb_unfused": res["unfused"]["saved"] / 2**20 if "unfused" in res else None,
                    **_rss_columns(
                        rss and dev.type == "cpu",
                        size,
                        L,
                        t,
                        n,
                        k,
                        batch,
                        dtype,
                        overrides,
                        fused_ce,
                    ),
                    "cuda_peak_mb": {k_: v["peak"] / 2**20 for k_, v in res.items()}
                    if dev.type == "cuda"
                    else None,
                    "device": str(dev),
                    "dtype": dtype,
                }
                rows.append(row)
                _print_row(row)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "fused_ce": fused_ce,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "bench.md").write_text(markdown(rows, meta, " ".join(sys.argv)))
        print(f"# wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return rows


def _rss_columns(
    on, size, L, t, n, k, batch, dtype, overrides, fused_ce
) -> dict[str, float | None]:
    """Peak RSS increase (MB) of the plain and the fast step, each in a fresh process."""
    if not on:
        return {"rss_mb_plain": None, "rss_mb_fast": None, "rss_mb_unfused": None}
    out = {
        f"rss_mb_{kind}": peak_rss_increase(
            kind, size, L, t, n, k, batch, dtype, overrides, fused_ce
        )
        for kind in ("plain", "fast")
    }
    out["rss_mb_unfused"] = (
        peak_rss_increase("fast", size, L, t, n, k, batch, dtype, overrides, "off")
        if fused_ce != "off"
        else None
    )
    return out


# dense bf16 peak TFLOP/s by device name (datasheet figures, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The accelerator's peak FLOP/s for MFU (CUDA, bf16 only); ``$QSTAR_PEAK_TFLOPS`` overrides."""
    import os

    if os.environ.get("QSTAR_PEAK_TFLOPS"):
        return float(os.environ["QSTAR_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _dense_step(qs, ids, gen):
    with qs.using(attention="dense"):
        _qstar_step(qs, ids, gen)


def _unfused_step(qs, ids, gen):
    mode, qs.fused_ce = qs.fused_ce, "off"
    try:
        _qstar_step(qs, ids, gen)
    finally:
        qs.fused_ce = mode


def _time(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _print_row(r: dict) -> None:
    if r.get("fast_mfu") is not None:
        print(
            f"   params {r['params_m']:.0f}M  fast {r['fast_tokens_per_s']:.0f} tokens/s  MFU fast "
            f"{r['fast_mfu']:.1%}  plain {r['plain_mfu']:.1%}  CUDA peak MB {r['cuda_peak_mb']}"
        )
    print(
        f"{r['model']:6} {r['L']:>4} {str(r['thought_len']) + ',' + str(r['n_true']):>6} {r['passes']:>6} "
        f"{r['plain_s']:8.3f} {r['fast_s']:8.3f} {r['fast_over_passes_plain']:14.2f} "
        f"{fmt(r['dense_s'], '8.3f')} {fmt(r['dense_over_fast'], '10.2f')} "
        f"{r['act_mb_plain']:12.0f} {r['act_mb_fast']:11.0f} {fmt(r['act_mb_dense'], '12.0f')} "
        f"{fmt(r.get('rss_mb_plain'), '12.0f')} {fmt(r.get('rss_mb_fast'), '11.0f')}"
        + (
            f"  | unfused {r['unfused_s']:.3f} s ({r['unfused_over_fast']:.2f}x fused), "
            f"act MB {r['act_mb_unfused']:.0f}, RSS MB {fmt(r.get('rss_mb_unfused'), '.0f')}"
            if r.get("unfused_s") is not None
            else ""
        ),
        flush=True,
    )


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    lines = [
        "# Train-step benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {json.dumps(meta)}",
        "",
        "Ratios are measured side by side in one run. `passes = thought_len + 2 + n_true`; "
        "`fast/(passes x plain)` near 1 means a Quiet-STaR step costs about its model passes. "
        "Activation MB = bytes autograd saves for backward. Peak RSS MB = the increase of the "
        "peak resident memory of a training step over the memory after building the model and "
        "AdamW (Adam's state and the gradients included), median of three fresh processes (CPU).",
        "",
    ]
    unfused = any(r.get("unfused_s") is not None for r in rows)
    head = (
        "| model | L | t,n | passes | plain s | fast s | fast/(passes x plain) | dense s | dense/fast "
        "| act MB plain | act MB fast | act MB dense | peak RSS MB plain | peak RSS MB fast |"
    )
    if unfused:
        lines += [
            f"`fast` computes every log-probability through the fused head (`fused_ce: "
            f"{meta.get('fused_ce')}`); `unfused` is the same step with the logits materialised "
            "(`fused_ce: off`), timed in the same interleaved loop.",
            "",
        ]
        head += " unfused s | unfused/fast | act MB unfused | peak RSS MB unfused |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        line = (
            f"| {r['model']} | {r['L']} | {r['thought_len']},{r['n_true']} | {r['passes']} | "
            f"{r['plain_s']:.3f} | {r['fast_s']:.3f} | {r['fast_over_passes_plain']:.2f} | "
            f"{fmt(r['dense_s'], '.3f')} | {fmt(r['dense_over_fast'], '.2f')} | "
            f"{r['act_mb_plain']:.0f} | {r['act_mb_fast']:.0f} | {fmt(r['act_mb_dense'], '.0f')} | "
            f"{fmt(r.get('rss_mb_plain'), '.0f')} | {fmt(r.get('rss_mb_fast'), '.0f')} |"
        )
        if unfused:
            line += (
                f" {fmt(r.get('unfused_s'), '.3f')} | {fmt(r.get('unfused_over_fast'), '.2f')} | "
                f"{fmt(r.get('act_mb_unfused'), '.0f')} | {fmt(r.get('rss_mb_unfused'), '.0f')} |"
            )
        lines.append(line)
    gpu = [r for r in rows if r.get("fast_mfu") is not None]
    if gpu:
        lines += [
            "",
            "| model | L | t,n | params (M) | fast tokens/s | MFU fast | MFU plain | CUDA peak MB (plain/fast/dense) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in gpu:
            peaks = "/".join(
                f"{r['cuda_peak_mb'].get(k, 0):.0f}" for k in ("plain", "fast", "dense")
            )
            lines.append(
                f"| {r['model']} | {r['L']} | {r['thought_len']},{r['n_true']} | {r['params_m']:.0f} | "
                f"{r['fast_tokens_per_s']:.0f} | {r['fast_mfu']:.1%} | {r['plain_mfu']:.1%} | {peaks} |"
            )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes", default="tiny,small", help="comma list of: tiny, small (default: tiny,small)"
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
    from qstar.config import quiet_star_overrides

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
        from qstar.analysis import bench_eval

        bench_eval.rationale_generation(model=args.model, repeats=args.repeats, out=args.out)
        return 0
    if args.generate:
        from qstar.analysis import bench_eval

        bench_eval.generation(
            model=args.model,
            thought_len=args.thought_len,
            repeats=args.repeats,
            out=args.out,
        )
        return 0
    if args.eval:
        from qstar.analysis import bench_eval

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
        **common,
    )
    return 0
