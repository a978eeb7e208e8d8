"""The train-step benchmark's timing loop (``qstar bench``; see :mod:`qstar.analysis.bench`): the
plain LM step, the sparse Quiet-STaR step and the dense-mask step timed interleaved in one
process, the bytes each saves for backward, and the table of their ratios."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qstar.analysis.bench_info import header, run_info
from qstar.analysis.bench_memory import (
    dense_attention_bytes,
    fmt,
    peak_rss_increase,
    saved_activation_bytes,
    wrap_model,
)
from qstar.config import ObjectiveConfig, QuietStarConfig
from qstar.core import learn
from qstar.models.random import mistral_shaped, tiny_tokenizer

DEFAULT_CONFIGS = ((5, 4), (9, 4), (13, 8), (21, 12))
HEADER = (
    f"{'model':6} {'L':>4} {'t,n':>6} {'passes':>6} {'plain s':>8} {'fast s':>8} "
    f"{'fast/(p*plain)':>14} {'dense s':>8} {'dense/fast':>10} "
    f"{'act MB plain':>12} {'act MB fast':>11} {'act MB dense':>12} "
    f"{'RSS MB plain':>12} {'RSS MB fast':>11}"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _plain_step(model, ids: torch.Tensor) -> None:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def _qstar_step(qs, ids: torch.Tensor, gen: torch.Generator, fraction: float = 1.0) -> None:
    objective = ObjectiveConfig(think_at="hardest", think_fraction=fraction)
    learn.objective_loss(qs, ids, objective, generator=gen).loss.backward()


@dataclass
class _Case:
    """One benchmarked configuration: model size, length, thought_len:n_true and the settings
    shared by every configuration of a run."""

    size: str
    L: int
    t: int
    n: int
    k: int
    batch: int
    dtype: str
    overrides: dict | None
    fused_ce: str
    think_fraction: float | None = None


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
    think_fraction: float | None = None,
) -> list[dict]:
    """The benchmark table (see :mod:`qstar.analysis.bench`). ``rss``: also measure each step's peak
    resident-memory increase in a fresh process (CPU only; a few seconds per configuration).
    ``think_fraction``: also time the step that thinks at that fraction of positions
    (``think_at: hardest``) beside the all-positions one."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = tiny_tokenizer()
    rows = []
    print(
        f"# device={dev} dtype={dtype} k={k} batch={batch} repeats={repeats} torch={torch.__version__}"
    )
    print(HEADER)
    for size in sizes:
        model, tok = _bench_model(size, torch_dtype, tok)
        model.to(dev).train()
        for L in lengths:
            gen_ids = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 32000, (batch, L), generator=gen_ids).to(dev)
            ids_k = ids.repeat_interleave(k, 0)
            for t, n in configs:
                case = _Case(size, L, t, n, k, batch, dtype, overrides, fused_ce, think_fraction)
                qcfg = QuietStarConfig(thought_len=t, n_true=n, n_thoughts=k).replace(
                    **(overrides or {})
                )
                qs = wrap_model(model, tok, qcfg, fused_ce).to(dev)
                steps = _steps(model, qs, ids, ids_k, qcfg, case, skip_dense, dense_limit_gb)
                res = _measure(steps, qs, dev, repeats)
                row = _row(case, qcfg.passes, res, model, dev, torch_dtype, rss)
                rows.append(row)
                _print_row(row)
    _write(out, rows, fused_ce)
    return rows


def _bench_model(size: str, dtype: torch.dtype, tok):
    """``(model, tokenizer)``: a random Mistral-shaped model of ``size`` with the test tokenizer,
    or for ``default`` the default model (SmolLM2-135M, offline) with its own tokenizer."""
    if size != "default":
        return mistral_shaped(size, dtype=dtype), tok
    from qstar.models.loading import load_model  # transformers' loaders: only when asked

    return load_model(dtype=dtype)


def _steps(model, qs, ids, ids_k, qcfg, case: _Case, skip_dense, dense_limit_gb) -> dict:
    """The steps to time for one configuration: plain and fast; dense where its attention fits
    under ``dense_limit_gb``; unfused beside the fused head."""
    mcfg = model.config
    gen = torch.Generator().manual_seed(0)
    steps = {
        "plain": functools.partial(_plain_step, model, ids_k),
        "fast": functools.partial(_qstar_step, qs, ids, gen),
    }
    dense_bytes = dense_attention_bytes(
        qcfg, case.L, mcfg.num_attention_heads, mcfg.num_hidden_layers, case.batch * case.k
    )
    if not skip_dense and dense_bytes < dense_limit_gb * 2**30:
        steps["dense"] = functools.partial(_dense_step, qs, ids, gen)
    if case.fused_ce != "off":  # the same step with logits materialised, side by side
        steps["unfused"] = functools.partial(_unfused_step, qs, ids, gen)
    if case.think_fraction is not None:  # thinking at a fraction of the positions
        steps["fraction"] = functools.partial(_qstar_step, qs, ids, gen, case.think_fraction)
    return steps


def _measure(steps: dict, qs, dev: torch.device, repeats: int) -> dict[str, dict]:
    """Per step: the seconds of each timed repeat, the bytes saved for backward and (CUDA) the
    peak allocated memory of the warm-up run."""
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
    return res


def _row(case: _Case, passes, res, model, dev, torch_dtype, rss) -> dict:
    """One row of the table: medians, ratios, memory and (GPU, bf16) MFU."""
    med = {name: statistics.median(v["times"]) for name, v in res.items()}
    n_params = sum(p.numel() for p in model.parameters())
    batch, k, L = case.batch, case.k, case.L
    token_passes = batch * k * L * passes  # every thought and true token: forward + backward
    peak = peak_flops(dev, torch_dtype)
    return {
        "params_m": n_params / 1e6,
        "fast_tokens_per_s": batch * L / med["fast"],
        "fast_mfu": 6 * n_params * token_passes / med["fast"] / peak if peak else None,
        "plain_mfu": 6 * n_params * batch * k * L / med["plain"] / peak if peak else None,
        "model": case.size,
        "L": L,
        "thought_len": case.t,
        "n_true": case.n,
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
        "think_fraction": case.think_fraction,
        "fraction_s": med.get("fraction"),
        "fraction_over_fast": med["fraction"] / med["fast"] if "fraction" in med else None,
        "act_mb_fraction": res["fraction"]["saved"] / 2**20 if "fraction" in res else None,
        **_rss_columns(
            rss and dev.type == "cpu",
            case.size,
            L,
            case.t,
            case.n,
            k,
            batch,
            case.dtype,
            case.overrides,
            case.fused_ce,
        ),
        "cuda_peak_mb": {k_: v["peak"] / 2**20 for k_, v in res.items()}
        if dev.type == "cuda"
        else None,
        "device": str(dev),
        "dtype": case.dtype,
    }


def _write(out: Path | None, rows: list[dict], fused_ce: str) -> None:
    """``bench.json`` and ``bench.md`` under ``out`` (nothing when ``out`` is ``None``)."""
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "fused_ce": fused_ce,
        **run_info(),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "bench.md").write_text(markdown(rows, meta))
        print(f"# wrote {out / 'bench.json'} and {out / 'bench.md'}")


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
    with qs.using(fused_ce="off"):
        _qstar_step(qs, ids, gen)


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
        )
        + (
            f"  | fraction {r['think_fraction']}: {r['fraction_s']:.3f} s "
            f"({r['fraction_over_fast']:.2f}x all positions), act MB {r['act_mb_fraction']:.0f}"
            if r.get("fraction_s") is not None
            else ""
        ),
        flush=True,
    )


def markdown(rows: list[dict], meta: dict) -> str:
    """bench.md; ``meta``: the environment and :func:`qstar.analysis.bench_info.run_info`."""
    lines = [
        *header("Train-step benchmark", meta),
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
    frac = [r for r in rows if r.get("fraction_s") is not None]
    if frac:
        lines += [
            "",
            "Thinking at a fraction of the positions (`think_at: hardest`), timed in the same "
            "interleaved loop as the all-positions step (`fast`):",
            "",
            "| model | L | t,n | fraction | fast s | fraction s | fraction/fast | act MB fast | "
            "act MB fraction |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in frac:
            lines.append(
                f"| {r['model']} | {r['L']} | {r['thought_len']},{r['n_true']} | "
                f"{r['think_fraction']} | {r['fast_s']:.3f} | {r['fraction_s']:.3f} | "
                f"{r['fraction_over_fast']:.2f} | {r['act_mb_fast']:.0f} | "
                f"{r['act_mb_fraction']:.0f} |"
            )
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
