"""Activation memory of a training step: the bytes autograd saves for backward (any device), and
``qstar bench --memory``, how they grow with thought length for the fast and the dense path
(the growth exponent: the slope of log bytes against log passes). Shared by :mod:`qstar.analysis.bench`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from qstar.analysis.bench_info import header, run_info
from qstar.config import QuietStarConfig
from qstar.core import learn
from qstar.core.model import QuietStar
from qstar.models.random import mistral_shaped, tiny_tokenizer


@contextlib.contextmanager
def saved_activation_bytes():
    """Yield a dict whose ``"bytes"`` is the size of distinct tensors saved for backward."""
    seen: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


def dense_attention_bytes(qcfg: QuietStarConfig, L: int, heads: int, layers: int, rows: int) -> int:
    """Rough bytes that the dense path's eager attention keeps for backward (scores + probs)."""
    D = qcfg.thought_block
    per_layer = sum(heads * L * (d + 2) * L for d in range(D)) * rows * 4 * 2
    return per_layer * layers


def wrap_model(model, tok, qcfg, fused_ce: str = "chunked"):
    """Wrap ``model`` again for each config without re-adding tokens (they are already there);
    ``fused_ce`` as ``train.fused_ce``."""
    qcfg = qcfg.replace(fused_ce=fused_ce)
    if qcfg.start_token in tok.get_vocab():
        return QuietStar(model, tok, qcfg)
    return QuietStar.from_base(model, tok, qcfg)


def fmt(x, spec):
    return format(x, spec) if x is not None else "-".rjust(len(format(0, spec)))


MEMORY_THOUGHT_LENS = (1, 2, 4, 8, 12, 16, 24)


def memory_growth(
    size: str = "tiny",
    L: int = 128,
    thought_lens=MEMORY_THOUGHT_LENS,
    n_true: int = 4,
    k: int = 2,
    device: str | None = None,
    dtype: str = "float32",
    dense_limit_gb: float = 6.0,
    out: Path | None = None,
    overrides: dict | None = None,
) -> list[dict]:
    """Saved activation bytes of one training forward against thought length (n_true fixed)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = tiny_tokenizer()
    model = mistral_shaped(size, dtype=torch_dtype).to(dev)
    model.train()
    mcfg = model.config
    ids = torch.randint(0, 32000, (1, L), generator=torch.Generator().manual_seed(0)).to(dev)
    rows = []
    print(f"# memory growth: model={size} L={L} n_true={n_true} k={k} device={dev} dtype={dtype}")
    print(f"{'t':>3} {'passes':>6} {'act MB fast':>11} {'act MB dense':>12} {'dense/fast':>10}")
    for t in thought_lens:
        qcfg = QuietStarConfig(thought_len=t, n_true=n_true, n_thoughts=k).replace(
            **(overrides or {})
        )
        qs = wrap_model(model, tok, qcfg).to(dev)
        row = {"thought_len": t, "n_true": n_true, "passes": qcfg.passes, "L": L, "k": k}
        for name in ("fast", "dense"):
            if (
                name == "dense"
                and dense_attention_bytes(
                    qcfg, L, mcfg.num_attention_heads, mcfg.num_hidden_layers, k
                )
                > dense_limit_gb * 2**30
            ):
                row["act_mb_dense"] = None
                continue
            with qs.using(attention="sparse" if name == "fast" else "dense"):
                with saved_activation_bytes() as acc:
                    gen = torch.Generator().manual_seed(0)
                    loss = learn.objective_loss(qs, ids, generator=gen).loss
            del loss  # the graph (and what it saved) goes with it
            row[f"act_mb_{name}"] = acc["bytes"] / 2**20
        rows.append(row)
        dense = row["act_mb_dense"]
        print(
            f"{t:>3} {row['passes']:>6} {row['act_mb_fast']:11.0f} {fmt(dense, '12.0f')} "
            f"{fmt(dense / row['act_mb_fast'] if dense else None, '10.2f')}",
            flush=True,
        )
    slopes = {name: _loglog_slope(rows, f"act_mb_{name}") for name in ("fast", "dense")}
    print(
        f"# growth exponent (act MB ~ passes^e): fast {slopes['fast']:.2f}, dense {fmt(slopes['dense'], '.2f')}"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "torch": torch.__version__,
            "model": size,
            "device": str(dev),
            "dtype": dtype,
            **run_info(),
        }
        (out / "memory.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "growth_exponent": slopes}, indent=2) + "\n"
        )
        (out / "memory.md").write_text(memory_markdown(rows, slopes, meta))
        _memory_figure(rows, out / "memory.png")
        print(f"# wrote {out / 'memory.md'}, memory.json and memory.png")
    return rows


def _loglog_slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(value) against log(passes) over the rows that have a value."""
    import math

    pts = [(math.log(r["passes"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def memory_markdown(rows: list[dict], slopes: dict, meta: dict) -> str:
    """memory.md; ``meta``: the environment and :func:`qstar.analysis.bench_info.run_info`."""
    lines = [
        *header("Activation memory against thought length", meta),
        f"One training forward, L={rows[0]['L']}, n_true={rows[0]['n_true']}, "
        f"k={rows[0]['k']}; activation MB = bytes autograd saves for backward. `passes = "
        "thought_len + 2 + n_true`. Growth exponent e: act MB ~ passes^e (least squares over the "
        "rows; 1 = linear, 2 = quadratic). A `-`: the dense path was skipped (its eager attention "
        "would keep more than the limit).",
        "",
        "| thought_len | passes | act MB fast | MB per pass fast | act MB dense | MB per pass dense | dense/fast |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fast, dense, p = r["act_mb_fast"], r["act_mb_dense"], r["passes"]
        lines.append(
            f"| {r['thought_len']} | {p} | {fast:.0f} | {fast / p:.1f} | {fmt(dense, '.0f')} | "
            f"{fmt(dense / p if dense else None, '.1f')} | {fmt(dense / fast if dense else None, '.2f')} |"
        )
    lines += [
        "",
        f"Growth exponent: fast **{slopes['fast']:.2f}**, dense **{fmt(slopes['dense'], '.2f')}**.",
    ]
    return "\n".join(lines) + "\n"


def _memory_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = [r["thought_len"] for r in rows]
    ax.plot(
        t,
        [r["act_mb_fast"] for r in rows],
        "o-",
        label="qstar (sampled without grad, one recompute)",
    )
    dense = [(r["thought_len"], r["act_mb_dense"]) for r in rows if r["act_mb_dense"]]
    if dense:
        ax.plot(*zip(*dense, strict=True), "s--", label="dense masks, one depth per call")
    ax.set_xlabel("thought tokens")
    ax.set_ylabel("activation MB saved for backward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- peak RSS
def _current_rss_bytes() -> int | None:
    """Resident memory now (Linux ``/proc``); ``None`` elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Return the allocator's free pages to the system (glibc), so that resident memory is what
    is in use and a later peak is not hidden by memory freed earlier but kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux >= 4.0), so the peak that
    follows is the step's and not the model construction's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The high-water mark of resident memory (``VmHWM``; ``ru_maxrss`` where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_child(spec: dict) -> dict:
    """In a fresh process: the peak resident memory of a training step (with AdamW) over the
    memory after building the model and optimiser, in MB: what a user's ``top`` shows, unlike the
    bytes saved for backward."""
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = mistral_shaped(spec["size"], dtype=dtype)
    model.train()
    L, k, batch = spec["L"], spec["k"], spec["batch"]
    ids = torch.randint(0, 32000, (batch, L), generator=torch.Generator().manual_seed(0))
    if spec["kind"] == "plain":
        module = model
        ids_k = ids.repeat_interleave(k, 0)

        def step():
            model(input_ids=ids_k, labels=ids_k).loss.backward()

    else:
        qcfg = QuietStarConfig(thought_len=spec["t"], n_true=spec["n"], n_thoughts=k).replace(
            **spec.get("overrides", {})
        )
        module = wrap_model(model, tiny_tokenizer(), qcfg, spec.get("fused_ce", "chunked"))
        gen = torch.Generator().manual_seed(0)

        def step():
            learn.objective_loss(module, ids, generator=gen).loss.backward()

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def train_step():
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # A first step pages in the code of every kernel the step runs and allocates Adam's state;
    # the second is measured. Adam's state is then added back exactly, so the figure is "peak
    # minus resident memory after building the model and optimiser" without the noise of
    # shared-library pages mapped on first use.
    train_step()
    adam = sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    _release_free_memory()
    before = _current_rss_bytes()
    _reset_peak_rss()
    train_step()
    peak = _peak_rss_bytes()
    return {
        "rss_before_mb": before / 2**20 if before else None,
        "adam_state_mb": adam / 2**20,
        "rss_increase_mb": (peak - before + adam) / 2**20 if before else None,
    }


def peak_rss_increase(
    kind: str,
    size: str,
    L: int,
    t: int,
    n: int,
    k: int,
    batch: int,
    dtype: str = "float32",
    overrides: dict | None = None,
    fused_ce: str = "chunked",
    processes: int = 3,
) -> float | None:
    """Peak RSS increase (MB) of a training step of ``kind`` (``"plain"`` or ``"fast"``), the
    median over ``processes`` fresh processes (:func:`rss_child`; the allocator makes single
    figures vary by about 10%); ``None`` where it cannot be measured (no ``/proc``)."""
    import statistics

    values = [
        _rss_in_fresh_process(kind, size, L, t, n, k, batch, dtype, overrides, fused_ce)
        for _ in range(processes)
    ]
    return None if None in values else statistics.median(values)


def _rss_in_fresh_process(kind, size, L, t, n, k, batch, dtype, overrides, fused_ce):
    import subprocess

    spec = dict(
        kind=kind,
        size=size,
        L=L,
        t=t,
        n=n,
        k=k,
        batch=batch,
        dtype=dtype,
        overrides=overrides or {},
        fused_ce=fused_ce,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "qstar.analysis.bench_memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"peak RSS measurement of {kind} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_increase_mb"]


if __name__ == "__main__":  # the fresh process of peak_rss_increase
    print(json.dumps(rss_child(json.loads(sys.argv[1]))))
