"""STaR (Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning") as a recipe beside
Quiet-STaR: ``train.method=star`` with the ``star`` config section (:class:`StarSection`).

One iteration ``n``:

1. the current model (the base model at ``n = 1``) writes a rationale and an answer for
   ``star.questions`` training questions, prompted by the task's worked examples;
2. the answers are checked (:func:`qstar.qa.is_correct`); correct rationales are kept;
3. with ``star.rationalize``, each wrong question is asked again with the correct answer as a hint,
   and a rationale that reaches it is kept *without* the hint in its training text;
4. the **base** model is fine-tuned on everything kept in this iteration (next-token NLL of the
   rationale and answer only; the question is context), for ``steps_per_iteration x
   step_growth^(n-1)`` steps of ``train.batch_size`` examples (the paper fine-tunes from the
   base model each iteration to avoid overfitting, with 20% more steps each time);
5. the fine-tuned model answers ``star.eval_questions`` held-out questions greedily; its accuracy
   is logged (``eval/qa_acc``) and it becomes the generator of iteration ``n + 1``.

The generator is a :class:`~qstar.core.model.QuietStar` like every model of the suite: with
``star.think`` it thinks before each token it writes (a Quiet-STaR checkpoint as the STaR
generator); without, it is the plain LM (same KV-cached batch generation, one prefill per
question). Fine-tuning trains the language model only (the thought machinery is not used).

Run directory: the usual ``config.yaml``, ``run.json``, ``metrics.jsonl`` (rows ``kind:
"iteration"`` with sampling figures, ``"train"`` per step, ``"eval"`` per iteration; ``step``
counts fine-tuning steps over the whole run), ``iterations/iter_N/kept.jsonl`` (the kept
rationales, ``rationalized`` marked) and ``rejected.jsonl`` (the incorrect first samples: V-STaR's
negatives), ``iterations/iter_N/model/`` (the last two iterations'
models), ``final/`` and ``summary.json``. A run resumes at the last finished iteration; each
iteration is seeded by ``train.seed`` and its number alone, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qstar.core import learn
from qstar.core.model import QuietStar
from qstar.errors import TrainingDiverged
from qstar.recipes.common import (
    autocast_for,
    build_model,
    build_optimizer,
    peak_memory_mb,
    pick_device,
)
from qstar.recipes.rundir import check_run_dir, write_json
from qstar.recipes.tracking import MetricsLogger, provenance, read_metrics, truncate_lines
from qstar.run_config import RunConfig

DEFAULT_SOURCES = {"gsm8k": "openai/gsm8k", "csqa": "tau/commonsense_qa"}
STOP_STRINGS = ("\nQ:", "\n\n")


# ============================================================================ generation
def stop_text(text: str) -> str:
    """A completion cut at the start of the next question or paragraph."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one of its own."""
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)


def sample_rationales(
    qs: QuietStar,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    think: bool,
    seed: int,
    batch: int,
    stop_early: bool = True,
    progress: str | None = None,
    share_prefix: bool = True,
) -> list[str]:
    """One completion per prompt: batched, KV-cached, left-padded generation
    (:func:`qstar.core.inference.generate`), greedy at ``temperature`` 0; each completion cut at
    :data:`STOP_STRINGS`. Generation of a batch ends once every row has stopped (with
    ``stop_early``; without, after ``max_new_tokens``, as the benchmark compares). The tokens
    every prompt of a batch starts with (the worked examples) are run once and their cache
    shared (``share_prefix``). ``progress``:
    the description of a progress bar counting rationales (with their rate per second)."""
    tok = qs.tokenizer
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=progress, unit="rationale", dynamic_ncols=True)
    device = next(qs.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = tok.eos_token_id
    out: list[str] = []
    for lo in range(0, len(prompts), batch):
        encoded = [tok(p, add_special_tokens=False).input_ids for p in prompts[lo : lo + batch]]
        shared = common_prefix(encoded) if share_prefix else 0
        prefix = torch.tensor(encoded[0][:shared], dtype=torch.long, device=device)
        encoded = [e[shared:] for e in encoded]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)

        def stop(tokens: torch.Tensor) -> torch.Tensor:
            texts = tok.batch_decode(tokens, skip_special_tokens=True)
            done = [any(s in t for s in STOP_STRINGS) for t in texts]
            if eos is not None:
                done = [d or bool((row == eos).any()) for d, row in zip(done, tokens, strict=True)]
            return torch.tensor(done, device=tokens.device)

        new = qs.generate(
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            think=think,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-6),
            generator=gen,
            stop=stop if stop_early else None,
            prefix=prefix,
        )
        for row in new.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out.append(stop_text(tok.decode(row, skip_special_tokens=True)))
        if bar is not None:
            bar.update(len(encoded))
    if bar is not None:
        bar.close()
    return out


# ============================================================================ one iteration
def write_provenance(cfg: RunConfig, run_dir: Path, qs, device, n_train: int, n_eval: int):
    """``run.json`` of a STaR-family run: the method, model, data and question counts."""
    info = {
        "method": cfg.train.method,
        "model": cfg.model.name,
        "model_source": getattr(qs.base_model, "qstar_source", None),
        "device": str(device),
        "data": cfg.star.source or DEFAULT_SOURCES[cfg.star.task],
        "train_questions": n_train,
        "eval_questions": n_eval,
    }
    (run_dir / "run.json").write_text(json.dumps(provenance(info), indent=2) + "\n")


def load_examples(cfg: RunConfig, held_out: bool = False) -> list:
    """The training questions (``star.source``, ``star.split``), or with ``held_out`` the
    evaluation questions (``star.eval_source``, default the same source, ``star.eval_split``)."""
    from qstar.qa import load_qa

    source = cfg.star.source or DEFAULT_SOURCES[cfg.star.task]
    if held_out:
        source = cfg.star.eval_source or source
    return load_qa(
        cfg.star.task,
        cfg.star.eval_split if held_out else cfg.star.split,
        source=source,
        data_dir=cfg.data.data_dir,
    )


def check_sources(cfg: RunConfig) -> None:
    """A local file names no split: used for training and evaluation, it would score the model
    on the questions it trained on. Refused, naming the fix."""
    from pathlib import Path as _P

    src = cfg.star.source
    if src and cfg.star.eval_source is None and _P(src).expanduser().exists():
        raise ValueError(
            f"star.source={src} is a local file or folder, which holds one split: set "
            "star.eval_source to the held-out questions (e.g. the test file)"
        )


def collect(
    qs: QuietStar, cfg: RunConfig, questions: list, seed: int, rejected: list | None = None
) -> tuple[list[dict], dict]:
    """Steps 1-3 of an iteration: sample, check, rationalise. Returns the kept examples
    (``prompt``: the question without any hint, ``target``: rationale and answer) and figures;
    the incorrect first samples are appended to ``rejected`` (V-STaR's negatives)."""
    from qstar.qa import format_prompt, is_correct, shots_for

    s = cfg.star
    shots = shots_for(s.task)[: s.shots]
    t0 = time.perf_counter()
    texts = sample_rationales(
        qs,
        [format_prompt(q, shots) for q in questions],
        s.max_new_tokens,
        s.temperature,
        s.think,
        seed,
        s.generation_batch,
        progress="sample" if cfg.logging.progress else None,
    )
    kept = [
        {"id": q.id, "prompt": format_prompt(q, []), "target": t, "rationalized": False}
        for q, t in zip(questions, texts, strict=True)
        if is_correct(q, t)
    ]
    n_correct = len(kept)
    wrong = [q for q, t in zip(questions, texts, strict=True) if not is_correct(q, t)]
    if rejected is not None:
        rejected += [
            {"id": q.id, "prompt": format_prompt(q, []), "target": t}
            for q, t in zip(questions, texts, strict=True)
            if not is_correct(q, t)
        ]
    n_rationalized = 0
    if s.rationalize and wrong:
        hinted = sample_rationales(
            qs,
            [format_prompt(q, shots, hint=q.answer) for q in wrong],
            s.max_new_tokens,
            s.temperature,
            s.think,
            seed + 1,
            s.generation_batch,
            progress="rationalise" if cfg.logging.progress else None,
        )
        for q, t in zip(wrong, hinted, strict=True):
            # a rationale that talks about the hint would teach the model to expect one
            if is_correct(q, t) and "hint" not in t.lower():
                kept.append(
                    {"id": q.id, "prompt": format_prompt(q, []), "target": t, "rationalized": True}
                )
                n_rationalized += 1
    seconds = time.perf_counter() - t0
    generated = len(questions) + (len(wrong) if s.rationalize else 0)
    return kept, {
        "questions": len(questions),
        "correct": n_correct,
        "sample_acc": n_correct / max(len(questions), 1),
        "rationalized": n_rationalized,
        "kept": len(kept),
        "rationales_per_s": generated / seconds if seconds else 0.0,
        "generation_s": seconds,
    }


def _batch(tok, rows: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention mask, completion mask)`` of prompt + target rows."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs, comp = [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False).input_ids
        t = tok(r["target"], add_special_tokens=False).input_ids
        if tok.eos_token_id is not None:
            t = t + [tok.eos_token_id]
        seqs.append(p + t)
        comp.append([0] * len(p) + [1] * len(t))
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    cmask = torch.tensor([c + [0] * (width - len(c)) for c in comp], device=device).bool()
    return ids, mask, cmask


def completion_logprobs(qs: QuietStar, ids, mask, cmask) -> torch.Tensor:
    """``(B,)`` summed log-probability of each row's completion tokens, through the fused head
    (:func:`qstar.core.selftaught.completion_logprob` on materialised logits is the reference)."""
    h = qs.backbone(inputs_embeds=qs.embed(ids), attention_mask=mask).last_hidden_state
    logprob = qs.token_logprob(h[:, :-1], ids[:, 1:])
    return (logprob * cmask[:, 1:]).sum(-1)


def final_tasks(qs: QuietStar, cfg: RunConfig, run_dir: Path) -> dict[str, float]:
    """``eval.tasks`` (lm-eval, the same code that scores Quiet-STaR runs) on the final model,
    with per-example scores under ``tasks/final/``; ``{}`` without tasks."""
    if not cfg.eval.tasks:
        return {}
    from qstar.evaluation.heldout import task_metrics

    return task_metrics(qs, cfg, cfg.star.think, run_dir / "tasks" / "final")


def completion_loss(qs: QuietStar, ids, mask, cmask) -> torch.Tensor:
    """Mean next-token NLL of the completion tokens (prompt tokens are context only), through
    the model's fused head."""
    h = qs.backbone(inputs_embeds=qs.embed(ids), attention_mask=mask).last_hidden_state
    logprob = qs.token_logprob(h[:, :-1], ids[:, 1:])
    return learn.masked_mean(-logprob, cmask[:, 1:])


def optimizer_step(params, optimizer, scheduler, grad_clip: float) -> tuple[float, float]:
    """Clip (``grad_clip`` 0: no clipping), step, schedule, zero: ``(grad norm, lr used)``."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def finetune(
    qs: QuietStar,
    cfg: RunConfig,
    kept: list[dict],
    steps: int,
    seed: int,
    log: Callable[[dict[str, Any]], None],
    step0: int,
    autocast,
) -> int:
    """Step 4: ``steps`` AdamW steps on ``kept`` (cycled in a seeded order). Returns the steps
    taken (0 when nothing was kept: the model stays the base model)."""
    if not kept:
        return 0
    params = [p for p in qs.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    rng = random.Random(seed)
    order: list[int] = []
    device = next(qs.parameters()).device
    qs.train()
    for i in range(steps):
        t0 = time.perf_counter()
        total, tokens = 0.0, 0
        for _ in range(cfg.train.batch_size // cfg.train.micro_batch_size):
            rows = []
            while len(rows) < cfg.train.micro_batch_size:
                if not order:
                    order = list(range(len(kept)))
                    rng.shuffle(order)
                rows.append(kept[order.pop()])
            ids, mask, cmask = _batch(qs.tokenizer, rows, device)
            with autocast:
                loss = completion_loss(qs, ids, mask, cmask)
            (loss / (cfg.train.batch_size // cfg.train.micro_batch_size)).backward()
            total += float(loss.detach()) * cfg.train.micro_batch_size / cfg.train.batch_size
            tokens += int(cmask.sum())
        if not math.isfinite(total):
            raise TrainingDiverged(
                f"STaR fine-tuning diverged at step {step0 + i + 1}: non-finite completion NLL "
                f"({total}); lower optim.lr"
            )
        grad_norm, lr = optimizer_step(params, optimizer, scheduler, cfg.optim.grad_clip)
        dt = time.perf_counter() - t0
        log(
            {
                "kind": "train",
                "step": step0 + i + 1,
                "loss": total,
                "completion_nll": total,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_per_s": tokens / dt,
                "step_s": dt,
            }
        )
    qs.eval()
    return steps


@torch.no_grad()
def qa_accuracy(qs: QuietStar, cfg: RunConfig, questions: list) -> dict[str, float]:
    """Step 5: greedy answers to held-out questions, checked."""
    from qstar.qa import format_prompt, is_correct, shots_for

    if not questions:
        return {}
    shots = shots_for(cfg.star.task)[: cfg.star.shots]
    was_training = qs.training
    qs.eval()
    try:
        texts = sample_rationales(
            qs,
            [format_prompt(q, shots) for q in questions],
            cfg.star.max_new_tokens,
            0.0,
            cfg.star.think,
            0,
            cfg.star.generation_batch,
            progress="evaluate" if cfg.logging.progress else None,
        )
    finally:
        qs.train(was_training)
    correct = [is_correct(q, t) for q, t in zip(questions, texts, strict=True)]
    return {"eval/qa_acc": sum(correct) / len(correct), "eval/qa_n": float(len(correct))}


# ============================================================================ the run
def _iteration_steps(cfg: RunConfig, n: int) -> int:
    return math.ceil(cfg.star.steps_per_iteration * cfg.star.step_growth ** (n - 1) - 1e-9)


def _last_iteration(run_dir: Path) -> int:
    done = [
        int(p.parent.name.split("_")[1])
        for p in (run_dir / "iterations").glob("iter_*/state.json")
        if (p.parent / "model").is_dir()
    ]
    return max(done, default=0)


def train_star(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[int, dict[str, Any], Path | None], None] | None = None,
    finish: bool = True,
) -> dict[str, Any]:
    """Run (or resume) STaR; returns the summary. With ``finish=False`` (V-STaR's generator)
    the run stops after its last iteration and returns ``{"model": the generator, ...}``
    without final tasks, ``final/`` or ``summary.json``. ``stop_after`` ends the run after that
    iteration (tests use it to simulate an interruption); ``on_eval(step, metrics, None)`` is
    called after each iteration's evaluation (sweeps report through it)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, cfg, resume)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    qs = build_model(cfg, device)
    qs.eval()
    check_sources(cfg)
    train_q = load_examples(cfg)
    eval_q = load_examples(cfg, held_out=True)[: cfg.star.eval_questions]
    base_state = {k: v.detach().clone() for k, v in qs.state_dict().items()}
    start = _last_iteration(run_dir) if resume else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if start == 0:
        write_provenance(cfg, run_dir, qs, device, len(train_q), len(eval_q))
    metrics = run_dir / "metrics.jsonl"
    step = 0
    if start:
        state = json.loads((run_dir / "iterations" / f"iter_{start}" / "state.json").read_text())
        step = state["step"]
        keep = sum(
            1 for r in read_metrics(metrics) if r.get("iteration", 0) <= start
        )  # rows are written in order: the prefix up to the iteration
        truncate_lines(metrics, keep)
        qs.load_state_dict(
            QuietStar.from_pretrained(run_dir / "iterations" / f"iter_{start}" / "model")
            .to(device)
            .state_dict()
        )
        print(f"qstar: resuming STaR after iteration {start}", file=sys.stderr)
    elif metrics.exists():
        metrics.unlink()
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
    autocast = autocast_for(cfg, device)
    t_start = time.perf_counter()
    first = last = None
    try:
        if start == 0:
            with autocast:
                first = last = qa_accuracy(qs, cfg, eval_q)
            logger.log({"kind": "eval", "step": 0, "iteration": 0, **first})
            if on_eval is not None:
                on_eval(0, {"kind": "eval", "step": 0, **first}, None)
        for n in range(start + 1, cfg.star.iterations + 1):
            seed = cfg.train.seed * 1_000_003 + n
            rng = random.Random(seed)
            questions = rng.sample(train_q, min(cfg.star.questions, len(train_q)))
            if cfg.train.method == "vstar":  # k solutions a question: the verifier's pairs
                questions = [q for q in questions for _ in range(cfg.star.samples)]
            rejected: list[dict] = []
            with autocast:
                kept, figures = collect(qs, cfg, questions, seed, rejected)
            logger.log({"kind": "iteration", "step": step, "iteration": n, **figures})
            it_dir = run_dir / "iterations" / f"iter_{n}"
            it_dir.mkdir(parents=True, exist_ok=True)
            for name, rows_ in (("kept", kept), ("rejected", rejected)):
                with (it_dir / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                    for row in rows_:
                        fh.write(json.dumps(row) + "\n")
            qs.load_state_dict(base_state)  # STaR fine-tunes the base model every iteration
            torch.manual_seed(seed)

            def log(row: dict[str, Any], n: int = n) -> None:
                logger.log({**row, "iteration": n})

            step += finetune(qs, cfg, kept, _iteration_steps(cfg, n), seed, log, step, autocast)
            with autocast:
                last = qa_accuracy(qs, cfg, eval_q)
            row = {"kind": "eval", "step": step, "iteration": n, **last}
            logger.log(row)
            qs.save_pretrained(it_dir / "model")
            write_json(it_dir / "state.json", {"iteration": n, "step": step, **figures})
            old = run_dir / "iterations" / f"iter_{n - cfg.train.keep_checkpoints}" / "model"
            if old.is_dir():
                shutil.rmtree(old)
            if on_eval is not None:
                on_eval(step, row, None)
            if stop_after is not None and n >= stop_after:
                return {"stopped_at": n, "run_dir": str(run_dir)}
    finally:
        logger.close()
    if not finish:
        return {"model": qs, "steps": step, "resumed_from": start or None, "eval_last": last}
    with autocast:
        tasks = final_tasks(qs, cfg, run_dir)
    final_dir = qs.save_pretrained(run_dir / "final")
    rows = read_metrics(metrics)
    evals = [r for r in rows if r.get("kind") == "eval"]
    summary = {
        "run_dir": str(run_dir),
        "method": "star",
        "iterations": cfg.star.iterations,
        "steps": step,
        "resumed_from": start or None,
        "seconds": time.perf_counter() - t_start,
        "peak_mem_mb": peak_memory_mb(device),
        "per_iteration": per_iteration(rows),
        "eval_first": strip_eval(evals[0]) if evals else first,
        "eval_last": {**(strip_eval(evals[-1]) if evals else last or {}), **tasks},
        "final_model": str(final_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def per_iteration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each iteration's sampling figures from ``metrics.jsonl`` rows (the summary's table)."""
    keys = ("iteration", "kept", "correct", "rationalized", "sample_acc")
    return [{k: r[k] for k in keys} for r in rows if r.get("kind") == "iteration"]


def strip_eval(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith("eval/")}


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of ``qstar train`` for STaR."""
    lines = [
        f"run directory   {summary['run_dir']}",
        f"iterations      {summary['iterations']} ({summary['steps']} fine-tuning steps, "
        f"{summary['seconds']:.1f} s, peak memory {summary['peak_mem_mb']:.0f} MB)",
    ]
    for it in summary["per_iteration"]:
        lines.append(
            f"iteration {it['iteration']:<5} sampled accuracy {it['sample_acc']:.3f}, kept "
            f"{it['kept']} ({it['correct']} correct, {it['rationalized']} rationalised)"
        )
    lines += accuracy_lines(summary)
    lines.append(f"final model     {summary['final_model']}")
    return "\n".join(lines)


def accuracy_lines(summary: dict[str, Any]) -> list[str]:
    """Held-out accuracy before and after, and the final lm-eval task scores."""
    lines = []
    for name, ev in (
        ("accuracy before", summary["eval_first"]),
        ("accuracy after", summary["eval_last"]),
    ):
        if ev and "eval/qa_acc" in ev:
            lines.append(
                f"{name:15} {ev['eval/qa_acc']:.3f} on {int(ev['eval/qa_n'])} held-out questions"
            )
    for key, value in sorted((summary.get("eval_last") or {}).items()):
        if not key.startswith("eval/qa_") and isinstance(value, float):
            lines.append(f"{key[5:]:15} {value:.3f}")
    return lines
