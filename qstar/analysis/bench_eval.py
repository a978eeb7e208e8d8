"""`qstar bench --eval`: held-out scoring with the fused head against materialised logits.

Evaluation needs ``log p(x_{i+1})`` at every position, with and without thinking (held-out NLL,
the content control). The fused path (:func:`qstar.core.inference.next_token_logprobs`) never
builds the ``(B, L, V)`` logits; the materialised path is what scoring did before: the logits
of ``mixed_logits`` / ``base_logits``, their log-softmax copy, then the gather. Both are timed
side by side in one process and their peak resident memory is measured in fresh processes
(the machinery of :mod:`qstar.analysis.bench_memory`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import qstar.qa as qa
from qstar.analysis.bench_info import header, run_info
from qstar.analysis.bench_memory import (
    _current_rss_bytes,
    _peak_rss_bytes,
    _release_free_memory,
    _reset_peak_rss,
    wrap_model,
)
from qstar.config import QuietStarConfig
from qstar.core.model import QuietStar
from qstar.models.loading import DEFAULT_MODEL
from qstar.models.random import mistral_shaped, tiny_tokenizer
from qstar.qa.sampling import sample_rationales

PATHS = ("fused", "logits")


@torch.no_grad()
def score(qs, ids: torch.Tensor, path: str) -> torch.Tensor:
    """``(B, L) -> (2, B, L - 1)`` log-probabilities of the true tokens, base then thinking."""

    if path == "fused":
        return torch.stack([qs.next_token_logprobs(ids, think=False), qs.next_token_logprobs(ids)])
    tgt = ids[:, 1:, None]
    return torch.stack(
        [
            torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt)[..., 0]
            for logits in (qs.base_logits(ids), qs.mixed_logits(ids))
        ]
    )


def _setup(size: str, L: int, batch: int, t: int):
    torch.manual_seed(0)
    model = mistral_shaped(size, dtype=torch.float32)
    qs = wrap_model(model, tiny_tokenizer(), QuietStarConfig(thought_len=t, n_true=1)).eval()
    ids = torch.randint(0, 32000, (batch, L), generator=torch.Generator().manual_seed(0))
    return qs, ids


def eval_child(spec: dict) -> dict:
    """In a fresh process: the peak RSS increase (MB) of scoring one batch by ``spec["path"]``
    over the memory after building the model (a first call pages in the kernels)."""
    qs, ids = _setup(spec["size"], spec["L"], spec["batch"], spec["t"])
    score(qs, ids, spec["path"])
    _release_free_memory()
    before = _current_rss_bytes()
    _reset_peak_rss()
    score(qs, ids, spec["path"])
    peak = _peak_rss_bytes()
    return {"rss_increase_mb": (peak - before) / 2**20 if before else None}


def _rss(spec: dict, processes: int) -> float | None:
    import subprocess

    values = []
    for _ in range(processes):
        proc = subprocess.run(
            [sys.executable, "-m", "qstar.analysis.bench_eval", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"peak RSS measurement of {spec['path']} scoring failed: {tail}")
        values.append(json.loads(proc.stdout.strip().splitlines()[-1])["rss_increase_mb"])
    return None if None in values else statistics.median(values)


def run(
    sizes=("tiny", "small"),
    lengths=(128, 256),
    batch: int = 8,
    t: int = 4,
    repeats: int = 2,
    rss: bool = True,
    out: Path | None = None,
) -> list[dict]:
    """The table: per model and length, seconds and peak RSS of both paths, and their ratios."""
    rows = []
    print(f"# eval scoring, batch={batch} thought_len={t} torch={torch.__version__}")
    print(f"{'model':6} {'L':>4} {'fused s':>8} {'logits s':>9} {'RSS MB fused':>12} "
          f"{'RSS MB logits':>13} {'max |diff|':>10}")  # fmt: skip
    for size in sizes:
        for L in lengths:
            qs, ids = _setup(size, L, batch, t)
            values = {p: score(qs, ids, p) for p in PATHS}  # warm-up, and the agreement
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            for _ in range(repeats):  # interleaved
                for p in PATHS:
                    t0 = time.perf_counter()
                    score(qs, ids, p)
                    times[p].append(time.perf_counter() - t0)
            spec = dict(size=size, L=L, batch=batch, t=t)
            row = {
                "model": size,
                "L": L,
                "batch": batch,
                "thought_len": t,
                "vocab": qs.base_model.config.vocab_size,
                **{f"{p}_s": statistics.median(times[p]) for p in PATHS},
                **{f"rss_mb_{p}": _rss({**spec, "path": p}, 3) if rss else None for p in PATHS},
                "max_abs_diff": float((values["fused"] - values["logits"]).abs().max()),
            }
            rows.append(row)
            print(
                f"{size:6} {L:>4} {row['fused_s']:8.3f} {row['logits_s']:9.3f} "
                f"{_fmt(row['rss_mb_fused']):>12} {_fmt(row['rss_mb_logits']):>13} "
                f"{row['max_abs_diff']:10.1e}",
                flush=True,
            )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, **run_info()}
        (out / "eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "eval.md").write_text(markdown(rows, meta))
        print(f"# wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return rows


def _fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    """eval.md; ``meta``: the environment and :func:`qstar.analysis.bench_info.run_info`."""
    lines = [
        *header("Evaluation scoring: fused head against materialised logits", meta),
        "Scoring one batch of held-out windows as `qstar train`'s evaluation does: `log p` of "
        "every true token without and with (greedy) thoughts. `fused`: through the fused head "
        "(no `(B, L, V)` logits); `logits`: the logits of `base_logits` / `mixed_logits`, their "
        "log-softmax and the gather. Seconds: median of interleaved repeats in one process. "
        "Peak RSS MB: the increase of a scoring call over the memory after building the model, "
        "median of three fresh processes. `max |diff|`: the largest difference of the two paths' "
        "log-probabilities (fp32).",
        "",
        "| model | L | batch | vocab | fused s | logits s | logits/fused | peak RSS MB fused "
        "| peak RSS MB logits | logits/fused | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (
            f"{r['rss_mb_logits'] / r['rss_mb_fused']:.2f}"
            if r["rss_mb_fused"] and r["rss_mb_logits"]
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['L']} | {r['batch']} | {r['vocab']} | {r['fused_s']:.3f} | "
            f"{r['logits_s']:.3f} | {r['logits_s'] / r['fused_s']:.2f} | "
            f"{_fmt(r['rss_mb_fused'])} | {_fmt(r['rss_mb_logits'])} | {ratio} | "
            f"{r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- generation
def _interleaved(runs: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """One warm-up call of each, then ``repeats`` rounds calling each in turn: the median
    seconds of each and its last output."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            outputs[key] = fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outputs


@torch.no_grad()
def generation(
    model: str | None = None,
    thought_len: int = 9,
    new_tokens: int = 16,
    samples: int = 8,
    repeats: int = 2,
    out: Path | None = None,
    think_threshold: float | None = None,
) -> dict:
    """Tokens/s of thinking generation against plain generation of the same model and prompt
    (greedy, one row), and ``samples`` sampled answers from one shared prefill against the same
    prompt repeated ``samples`` times in the batch. Interleaved repeats, medians.
    ``think_threshold`` (a model with a gate): also gated thinking, and the share of tokens that
    thought."""
    name = model or DEFAULT_MODEL
    torch.manual_seed(0)
    qs = QuietStar.from_pretrained(name).eval()
    qs.config = qs.config.replace(thought_len=thought_len)
    prompt = "Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\nA:"
    ids = torch.tensor([qs.tokenizer.encode(prompt, add_special_tokens=False)])
    gen = dict(max_new_tokens=new_tokens)
    runs = {
        "plain": lambda: qs.generate(ids, think=False, **gen),
        "think": lambda: qs.generate(ids, think=True, **gen),
        "sampled_shared": lambda: qs.generate(
            ids, do_sample=True, copies=samples, generator=torch.Generator().manual_seed(0), **gen
        ),
        "sampled_separate": lambda: qs.generate(
            ids.repeat(samples, 1),
            do_sample=True,
            generator=torch.Generator().manual_seed(0),
            **gen,
        ),
    }
    gate_stats: dict = {}
    if think_threshold is not None:
        runs["gated"] = lambda: qs.generate(
            ids, think=True, think_threshold=think_threshold, stats=gate_stats, **gen
        )
    med, outputs = _interleaved(runs, repeats)
    emitted = {k: v.numel() for k, v in outputs.items()}
    result = {
        "model": name,
        "thought_len": thought_len,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "samples": samples,
        "plain_tokens_per_s": emitted["plain"] / med["plain"],
        "think_tokens_per_s": emitted["think"] / med["think"],
        "think_over_plain_time": med["think"] / med["plain"] * emitted["plain"] / emitted["think"],
        "target_ratio": thought_len + 2,
        "sampled_shared_s": med["sampled_shared"],
        "sampled_separate_s": med["sampled_separate"],
        **(
            {
                "think_threshold": think_threshold,
                "gated_tokens_per_s": emitted["gated"] / med["gated"],
                "gated_over_think_speed": med["think"] / med["gated"],
                "gated_fraction": gate_stats["thought"] / max(gate_stats["positions"], 1),
            }
            if think_threshold is not None
            else {}
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **run_info(),
    }
    _print_generation(result, med, ids.shape[1])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------- rationales
@torch.no_grad()
def rationale_generation(
    model: str | None = None,
    questions: int = 16,
    new_tokens: int = 64,
    shots: int = 4,
    repeats: int = 2,
    out: Path | None = None,
) -> dict:
    """Rationales/s of the STaR family's sampler (:func:`qstar.qa.sampling.sample_rationales`:
    one left-padded batch, KV cache, no thinking) against ``transformers``' ``generate`` on the
    same batch of few-shot GSM8K prompts, both greedy for exactly ``new_tokens`` tokens (so both
    do the same work); and the sampler as the recipes run it (stopping rows at the end of the
    answer). Interleaved repeats, medians."""
    name = model or DEFAULT_MODEL
    torch.manual_seed(0)
    qs = QuietStar.from_pretrained(name).eval()
    tok = qs.tokenizer
    examples = qa.load_qa("gsm8k", "test", source="openai/gsm8k", limit=questions)
    prompts = [qa.format_prompt(q, qa.shots_for("gsm8k")[:shots]) for q in examples]
    encoded = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, encoded))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = (
        torch.arange(width)[None] >= torch.tensor([width - len(e) for e in encoded])[:, None]
    ).long()
    n = len(prompts)

    def hf():
        return qs.base_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )

    runs = {
        "transformers": hf,
        "qstar": lambda: sample_rationales(
            qs, prompts, new_tokens, 0.0, False, 0, n, stop_early=False
        ),
        "qstar_stopping": lambda: sample_rationales(qs, prompts, new_tokens, 0.0, False, 0, n),
    }
    med, _ = _interleaved(runs, repeats)
    result = {
        "model": name,
        "questions": n,
        "shots": shots,
        "prompt_tokens_max": width,
        "new_tokens": new_tokens,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_rationales_per_s": n / v for k, v in med.items()},
        "qstar_over_transformers_time": med["qstar"] / med["transformers"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **run_info(),
    }
    print(
        f"# rationale sampling, {name}, {n} GSM8K questions with {shots} worked examples "
        f"(prompts up to {width} tokens), greedy, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
        f"{new_tokens} tokens each: transformers.generate {med['transformers']:.2f} s "
        f"({n / med['transformers']:.2f} rationales/s), qstar {med['qstar']:.2f} s "
        f"({n / med['qstar']:.2f} rationales/s): {result['qstar_over_transformers_time']:.2f}x the time\n"
        f"qstar stopping each row at the end of its answer: {med['qstar_stopping']:.2f} s "
        f"({n / med['qstar_stopping']:.2f} rationales/s)",
        flush=True,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rationales.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # the fresh process of _rss
    print(json.dumps(eval_child(json.loads(sys.argv[1]))))


def _print_generation(result: dict, med: dict, prompt_tokens: int) -> None:
    name, thought_len, new_tokens = result["model"], result["thought_len"], result["new_tokens"]
    samples, think_threshold = result["samples"], result.get("think_threshold")
    print(
        f"# generation, {name}, thought_len={thought_len}, {new_tokens} new tokens, "
        f"prompt {prompt_tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"plain {result['plain_tokens_per_s']:.2f} tokens/s, thinking "
        f"{result['think_tokens_per_s']:.2f} tokens/s: thinking costs "
        f"{result['think_over_plain_time']:.2f}x plain per token (target <= {thought_len + 2}x, "
        f"the thought's passes)\n"
        f"{samples} sampled thinking answers: one shared prefill {med['sampled_shared']:.2f} s, "
        f"the prompt repeated {med['sampled_separate']:.2f} s "
        f"({med['sampled_separate'] / med['sampled_shared']:.2f}x)",
        flush=True,
    )
    if think_threshold is not None:
        print(
            f"gated (threshold {think_threshold}): {result['gated_tokens_per_s']:.2f} tokens/s, "
            f"{result['gated_over_think_speed']:.2f}x always-on thinking; "
            f"{result['gated_fraction']:.1%} of tokens thought",
            flush=True,
        )
