"""STaR (Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning") as a recipe:
``train.method=star`` with the ``qa`` and ``star`` config sections.

One iteration ``n`` (one step of the shared loop, so checkpoints and resume come per iteration):

1. the current model (the base model at ``n = 1``) writes a rationale and an answer for
   ``qa.questions`` training questions, prompted by the task's worked examples;
2. the answers are checked (:func:`qstar.qa.answers.is_correct`); correct rationales are kept;
3. with ``star.rationalize``, each wrong question is asked again with the correct answer as a hint,
   and a rationale that reaches it is kept *without* the hint in its training text;
4. the **base** model is fine-tuned on everything kept in this iteration (next-token NLL of the
   rationale and answer only; the question is context), for ``steps_per_iteration x
   step_growth^(n-1)`` steps of ``train.batch_size`` examples (the paper fine-tunes from the
   base model each iteration to avoid overfitting, with 20% more steps each time);
5. the fine-tuned model answers ``qa.eval_questions`` held-out questions greedily; its accuracy
   is logged (``eval/qa_acc``) and it becomes the generator of iteration ``n + 1``.

The generator is a :class:`~qstar.core.model.QuietStar` like every model of the suite: with
``qa.think`` it thinks before each token it writes (a Quiet-STaR checkpoint as the STaR
generator); without, it is the plain LM. Fine-tuning trains the language model only.

Run directory: the common one (:mod:`qstar.runs`), with ``metrics.jsonl`` rows ``kind:
"iteration"`` (sampling figures), ``"train"`` per fine-tuning step (``step`` counts them over
the whole run) and ``"eval"`` per iteration; ``iterations/iter_N/kept.jsonl`` (the kept
rationales, ``rationalized`` marked) and ``rejected.jsonl`` (the incorrect first samples:
V-STaR's negatives). Each iteration is seeded by ``train.seed`` and its number alone, so a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import torch

from qstar.core.model import QuietStar
from qstar.evaluation.heldout import task_metrics
from qstar.qa import answers, check_sources, format_prompt, load_examples, shots_for
from qstar.qa.sampling import qa_accuracy, sample_rationales
from qstar.qa.scoring import completion_batch, completion_loss
from qstar.recipes.base import Recipe
from qstar.recipes.registry import Method, register
from qstar.run_config import QASection, StarSection
from qstar.runs import distributed
from qstar.runs.build import build_optimizer
from qstar.runs.session import optimizer_layout
from qstar.runs.state import Run
from qstar.runs.step import optimizer_step


def collect(
    run: Run, cfg, questions: list, seed: int, rejected: list | None = None
) -> tuple[list[dict], dict]:
    """Steps 1-3 of an iteration: sample, check, rationalise. Returns the kept examples
    (``prompt``: the training prompt of ``star.train_format``, never with a hint; ``target``:
    rationale and answer) and figures; the incorrect first samples are appended to ``rejected``
    (V-STaR's negatives). Several processes share the sampling. A rationalisation is kept only
    if its reasoning reaches the answer (:func:`qstar.qa.answers.reaches_answer`), not when it
    merely repeats the hint."""
    qa = cfg.qa
    shots = shots_for(qa.task)[: qa.shots]
    t0 = time.perf_counter()
    texts = _sample(run, [format_prompt(q, shots) for q in questions], seed, "sample")
    correct = [answers.is_correct(q, t) for q, t in zip(questions, texts, strict=True)]
    train_shots = shots if cfg.star.train_format == "sampled" else []
    kept = [
        {"id": q.id, "prompt": format_prompt(q, train_shots), "target": t, "rationalized": False}
        for q, t, ok in zip(questions, texts, correct, strict=True)
        if ok
    ]
    n_correct = len(kept)
    wrong = [q for q, ok in zip(questions, correct, strict=True) if not ok]
    if rejected is not None:
        rejected += [
            {"id": q.id, "prompt": format_prompt(q, train_shots), "target": t}
            for q, t, ok in zip(questions, texts, correct, strict=True)
            if not ok
        ]
    n_rationalized = 0
    if cfg.star.rationalize and wrong:
        prompts = [format_prompt(q, shots, hint=q.answer) for q in wrong]
        for q, t in zip(wrong, _sample(run, prompts, seed + 1, "rationalise"), strict=True):
            # a rationale that talks about the hint would teach the model to expect one
            if answers.reaches_answer(q, t) and "hint" not in t.lower():
                kept.append(
                    {
                        "id": q.id,
                        "prompt": format_prompt(q, train_shots),
                        "target": t,
                        "rationalized": True,
                    }
                )
                n_rationalized += 1
    seconds = time.perf_counter() - t0
    generated = len(questions) + (len(wrong) if cfg.star.rationalize else 0)
    return kept, {
        "questions": len(questions),
        "correct": n_correct,
        "sample_acc": n_correct / max(len(questions), 1),
        "rationalized": n_rationalized,
        "kept": len(kept),
        "rationales_per_s": generated / seconds if seconds else 0.0,
        "generation_s": seconds,
    }


def sample_shared(
    run: Run, prompts: list[str], seed: int, what: str | None = None, return_ids: bool = False
) -> list:
    """Rationales for ``prompts`` at ``qa.temperature``, in batches of ``qa.generation_batch``
    each seeded by ``seed`` and its index, shared out over the processes (batch ``c`` on process
    ``c mod world``): the same rationales on any number of processes."""
    qa = run.cfg.qa
    size = qa.generation_batch
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    progress = what if run.cfg.logging.progress and run.ctx.main else None

    def fn(indexed: list[tuple[int, list[str]]]) -> list[list]:
        return [
            sample_rationales(
                run.qs,
                chunk,
                qa.max_new_tokens,
                qa.temperature,
                qa.think,
                seed * 7919 + c,
                size,
                progress=progress,
                return_ids=return_ids,
            )
            for c, chunk in indexed
        ]

    with torch.no_grad(), run.autocast:
        done = distributed.shard_map(fn, list(enumerate(chunks)), run.ctx, not run.fsdp)
    return [x for chunk in done for x in chunk]


def _sample(run: Run, prompts: list[str], seed: int, what: str) -> list[str]:
    """:func:`sample_shared`'s texts."""
    return sample_shared(run, prompts, seed, what)


def finetune(run: Run, kept: list[dict], steps: int, seed: int, step0: int, iteration: int) -> int:
    """Step 4: ``steps`` optimiser steps on ``kept`` (cycled in a seeded order, each step's
    micro-batches shared out over the processes), from a fresh optimiser. Returns the steps
    taken (0 when nothing was kept: the model stays the base model)."""
    if not kept:
        return 0
    cfg, ctx = run.cfg, run.ctx
    _, groups = optimizer_layout(cfg, run.qs, run.roles)
    run.optimizer, run.scheduler = build_optimizer(cfg, groups)
    rng = random.Random(seed)
    order: list[int] = []
    micro = cfg.train.micro_batch_size
    run.qs.train()
    for i in range(steps):
        t0 = time.perf_counter()
        total, tokens = 0.0, 0
        for _ in range(run.accum):
            batches = []
            for _ in range(ctx.world):  # the same order on every process
                rows = []
                while len(rows) < micro:
                    if not order:
                        order = list(range(len(kept)))
                        rng.shuffle(order)
                    rows.append(kept[order.pop()])
                batches.append(rows)
            ids, mask, cmask = completion_batch(run.qs.tokenizer, batches[ctx.rank], run.device)
            with run.autocast:
                loss = completion_loss(run.model, ids, mask, cmask)
            (loss / run.accum).backward()
            total += float(loss.detach()) / run.accum
            tokens += int(cmask.sum())
        opt = optimizer_step(run, {"loss": total, "completion_nll": total}, step0 + i + 1)
        dt = time.perf_counter() - t0
        run.log(
            {
                "kind": "train",
                "step": step0 + i + 1,
                "iteration": iteration,
                **opt,
                "tokens": distributed.total(tokens, ctx),
                "tokens_per_s": tokens / dt,
                "step_s": dt,
            }
        )
    run.qs.eval()
    return steps


def iteration_steps(cfg, n: int) -> int:
    """Fine-tuning steps of iteration ``n``: ``steps_per_iteration x step_growth^(n-1)``."""
    return math.ceil(cfg.star.steps_per_iteration * cfg.star.step_growth ** (n - 1) - 1e-9)


class StarRecipe(Recipe):
    """STaR: a step is an iteration (the module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ft_steps = 0  # fine-tuning steps so far, over the whole run
        self.train_q: list = []
        self.eval_q: list = []
        self.base_state: dict[str, torch.Tensor] = {}

    def check(self) -> None:
        check_sources(self.cfg.qa)

    def prepare(self, qs: QuietStar, ctx) -> dict[str, Any]:
        qa = self.cfg.qa
        self.train_q = load_examples(qa, self.cfg.data.data_dir)
        self.eval_q = load_examples(qa, self.cfg.data.data_dir, held_out=True)[: qa.eval_questions]
        self.base_state = {k: v.detach().clone() for k, v in qs.state_dict().items()}
        qs.eval()
        return {
            "data": qa.source or qa.task,
            "train_questions": len(self.train_q),
            "eval_questions": len(self.eval_q),
        }

    def total_steps(self) -> int:
        return self.cfg.star.iterations

    def eval_due(self, step: int) -> bool:
        return True

    def checkpoint_due(self, step: int) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"ft_steps": self.ft_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ft_steps = int(state["ft_steps"])

    def questions(self, n: int) -> list:
        """Iteration ``n``'s training questions (seeded by ``train.seed`` and ``n``)."""
        rng = random.Random(self.cfg.train.seed * 1_000_003 + n)
        return rng.sample(self.train_q, min(self.cfg.qa.questions, len(self.train_q)))

    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        seed = self.cfg.train.seed * 1_000_003 + step
        rejected: list[dict] = []
        kept, figures = collect(run, self.cfg, self.questions(step), seed, rejected)
        row = {"kind": "iteration", "step": self.ft_steps, "iteration": step, **figures}
        run.log(row)
        if run.ctx.main:
            it_dir = run.run_dir / "iterations" / f"iter_{step}"
            it_dir.mkdir(parents=True, exist_ok=True)
            for name, rows in (("kept", kept), ("rejected", rejected)):
                with (it_dir / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in rows)
        run.qs.load_state_dict(self.base_state)  # STaR fine-tunes the base model every time
        torch.manual_seed(seed)
        steps = iteration_steps(self.cfg, step)
        data = self.training_data(run, step, kept)
        self.ft_steps += finetune(run, data, steps, seed, self.ft_steps, step)
        return row

    def training_data(self, run: Run, step: int, kept: list[dict]) -> list[dict]:
        """What iteration ``step`` fine-tunes on: STaR, its own kept rationales."""
        return kept

    def evaluate(self, run: Run, step: int) -> dict[str, Any] | None:
        row: dict[str, float] = {}
        if run.ctx.main or run.fsdp:
            with run.autocast:
                row = qa_accuracy(run.qs, self.cfg.qa, self.eval_q, self.cfg.logging.progress)
        row = distributed.broadcast(row, run.ctx)
        return {"kind": "eval", "step": self.ft_steps, "iteration": step, **row}

    def summary(self, run: Run) -> dict[str, Any]:
        rows = run.rows() if run.ctx.main else []
        evals = [r for r in rows if r.get("kind") == "eval" and "eval/qa_acc" in r]
        return {
            "iterations": self.cfg.star.iterations,
            "steps": self.ft_steps,
            "per_iteration": per_iteration(rows),
            "eval_first": strip_eval(evals[0]) if evals else None,
            "eval_last": {**(strip_eval(evals[-1]) if evals else {}), **final_tasks(run)},
        }

    @staticmethod
    def report_figures(summary: dict[str, Any]) -> dict[str, Any]:
        return iteration_figures(summary)

    @staticmethod
    def format_summary(summary: dict[str, Any]) -> str:
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


def iteration_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Rationales kept and sampled accuracy per iteration (a report's columns)."""
    per = summary.get("per_iteration") or []
    if not per:
        return {}
    return {
        "kept per iteration": "/".join(str(p["kept"]) for p in per),
        "sampled acc per iteration": "/".join(f"{p['sample_acc']:.2f}" for p in per),
    }


def final_tasks(run: Run) -> dict[str, float]:
    """``eval.tasks`` (lm-eval, the same code that scores Quiet-STaR runs) on the final model,
    with per-example scores under ``tasks/final/``; ``{}`` without tasks (or off the main
    process)."""
    cfg = run.cfg
    if not cfg.eval.tasks or not run.ctx.main or run.fsdp:
        return {}
    with torch.no_grad(), run.autocast:
        return task_metrics(
            run.qs, cfg, cfg.qa.think, run.run_dir / "tasks" / "final", plain=not cfg.qa.think
        )


def per_iteration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each iteration's sampling figures from ``metrics.jsonl`` rows (the summary's table)."""
    keys = ("iteration", "kept", "correct", "rationalized", "sample_acc")
    return [{k: r[k] for k in keys} for r in rows if r.get("kind") == "iteration"]


def strip_eval(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith("eval/")}


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


register(Method("star", StarRecipe, "STaR", (("qa", QASection), ("star", StarSection))))
