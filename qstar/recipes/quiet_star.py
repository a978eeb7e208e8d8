"""The Quiet-STaR recipe on text windows, and the no-thought baseline (``train.objective=lm``):
each step is ``train.batch_size`` windows through the model's training forward and an
objective (:data:`qstar.core.learn.OBJECTIVES`); every ``eval.every`` steps, held-out NLL with
and without thoughts (and lm-eval tasks when due). Everything else is the shared loop
(:mod:`qstar.recipes.base`)."""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qstar.core import learn
from qstar.core.model import QuietStar
from qstar.data import DataError, WindowStream, fixed_windows, load_documents, tokenize
from qstar.evaluation.heldout import heldout_nll, task_metrics
from qstar.qa import load_examples
from qstar.qa.sampling import qa_accuracy
from qstar.recipes.base import Recipe
from qstar.recipes.reference import EmaReference
from qstar.recipes.registry import Method, register
from qstar.run_config import QuietStarSection, RunConfig
from qstar.runs import distributed
from qstar.runs.build import autocast_for, model_dtype, peak_memory_mb, pick_device
from qstar.runs.rundir import write_json, write_summary
from qstar.runs.state import Run
from qstar.runs.step import optimizer_step
from qstar.runs.tracking import MetricsLogger
from qstar.sections import thought_len_schedule


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[WindowStream, list[list[int]], dict[str, Any]]:
    """The training window stream, the fixed held-out windows and what ``run.json`` records."""
    d = cfg.data
    common = dict(
        text_field=d.text_field,
        template=d.template,
        on_bad_row=d.on_bad_row,
        configured_dir=d.data_dir,
        hub_config=d.hub_config,
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
    )
    held_out = 0 if d.val_source else d.val_documents
    limit = None if d.max_documents is None else d.max_documents + held_out
    docs = load_documents(d.source, d.split, max_documents=limit, **common)
    train_docs = tokenize(tokenizer, docs.texts)
    if d.val_source:
        val = load_documents(
            d.val_source, d.val_split or d.split, max_documents=max(cfg.eval.windows, 1), **common
        )
        val_docs = tokenize(tokenizer, val.texts)
    else:
        order = list(range(len(train_docs)))
        random.Random(cfg.train.seed).shuffle(order)
        if held_out >= len(order):
            raise DataError(
                f"data.val_documents={held_out} leaves no training documents "
                f"({len(order)} usable); lower it or set data.val_source"
            )
        val_docs = [train_docs[i] for i in order[:held_out]]
        train_docs = [train_docs[i] for i in order[held_out:]]
    stream = WindowStream(
        train_docs,
        d.window,
        d.windowing,
        cfg.train.seed,
        pad_id=pad_id(tokenizer),
        eos_id=tokenizer.eos_token_id,
    )
    windows = (
        fixed_windows(
            val_docs,
            d.window,
            cfg.eval.windows,
            cfg.train.seed if cfg.eval.heldout_seed is None else cfg.eval.heldout_seed,
        )
        if val_docs and cfg.eval.windows
        else []
    )
    info = {
        "data_source": docs.source,
        "data_origin": docs.origin,
        **({"val_data_source": val.source, "val_data_origin": val.origin} if d.val_source else {}),
        "train_documents": len(train_docs),
        "val_windows": len(windows),
        "skipped_rows": docs.skipped,
        "skipped_examples": docs.skipped_examples,
    }
    return stream, windows, info


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def tasks_due(cfg: RunConfig, step: int) -> bool:
    """Whether ``eval.tasks`` run at this evaluation (``eval.tasks_at``)."""
    last = step == cfg.train.steps
    return {"every": True, "end": last, "start_end": last or step == 0}[cfg.eval.tasks_at]


class QuietStarRecipe(Recipe):
    """Quiet-STaR (``train.objective=quiet_star``) or the no-thought baseline (``lm``)."""

    find_unused = True  # set per instance below

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.loss_fn, self.thinks = learn.OBJECTIVES[cfg.train.objective]
        self.find_unused = not self.thinks  # the baseline never touches meta tokens or the head
        self.objective = cfg.quiet_star.objective()
        self.stream: WindowStream | None = None
        self.val_windows: list[list[int]] = []
        self.skipped_info: dict[str, Any] = {}
        self.tokens_total = 0
        self.last_row: dict[str, Any] = {}
        self.reference: EmaReference | None = None

    def check(self) -> None:
        cfg = self.cfg
        objective = self.objective
        if cfg.train.parallel == "fsdp" and self.thinks:
            if objective.trunk_grad == "lm_only" or objective.reward_reference == "ema":
                raise ValueError(
                    "quiet_star.trunk_grad=lm_only and quiet_star.reward_reference=ema need the "
                    "whole weights in every process (detached views, a moving-average copy); "
                    "train.parallel=fsdp shards them: use train.parallel=ddp"
                )

    def prepare(self, qs: QuietStar, ctx: distributed.Context) -> dict[str, Any]:
        if self.thinks and self.objective.reward_reference == "ema":
            self.reference = EmaReference(qs.base_model, self.objective.ema_decay)
        self.stream, self.val_windows, info = prepare_data(self.cfg, qs.tokenizer)
        if info["skipped_rows"] and ctx.main:
            print(
                f"qstar: skipped {info['skipped_rows']} bad rows, e.g. "
                f"{info['skipped_examples'][0]}",
                file=sys.stderr,
            )
        return info

    def begin(self, run: Run) -> None:
        if run.ctx.main:  # the windows as token ids: reports analyse the run without its data
            write_json(run.run_dir / "heldout.json", {"windows": self.val_windows})

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state()}

    def tensor_state(self) -> dict[str, Any]:
        return self.reference.state() if self.reference is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state(state["data"])
        if self.reference is not None:
            self.reference.load(state["tensors"])

    # ------------------------------------------------------------------ one step
    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        """One step; under ``train.thought_len_schedule`` at that step's thought length."""
        length = self.thought_len_at(step)
        if length is None:
            return self._step(run, step)
        with run.qs.using(thought_len=length):
            return self._step(run, step)

    def thought_len_at(self, step: int) -> int | None:
        """The curriculum's thought length at ``step`` (``None``: no schedule)."""
        schedule = thought_len_schedule(self.cfg.train.thought_len_schedule)
        if not schedule:
            return None
        return [length for first, length in schedule if first <= step][-1]

    def _step(self, run: Run, step: int) -> dict[str, Any]:
        cfg, ctx = run.cfg, run.ctx
        t0 = time.perf_counter()
        parts: dict[str, float] = {}
        tokens = 0
        for _ in range(run.accum):
            batches = [
                self.stream.next_batch(cfg.train.micro_batch_size) for _ in range(ctx.world)
            ]  # the same order everywhere
            ids, mask = (t.to(run.device) for t in batches[ctx.rank])
            tokens += int(mask.sum())
            with run.autocast:
                out = run.model(
                    ids,
                    attention_mask=mask,
                    generator=run.generator,
                    think=self.thinks,
                    policy_temperature=self.objective.policy_temperature,
                    trunk_grad=self.objective.trunk_grad,
                    think_at=self.objective.think_at,
                    think_fraction=self.objective.think_fraction,
                )
                reference = self.reference.logprob(ids, mask) if self.reference else None
            loss = (
                self.loss_fn(out, self.objective, reference)
                if reference is not None
                else self.loss_fn(out, self.objective)
            )
            if run.grad_parts is not None:
                run.grad_parts.add(loss.policy_term / run.accum)
            (loss.loss / run.accum).backward()
            for key, value in learn.step_stats(out, loss).items():
                parts[key] = parts.get(key, 0.0) + value / run.accum
        opt = optimizer_step(run, parts, step)
        if self.reference is not None and "skipped_nonfinite" not in opt:
            self.reference.update()
        tokens = distributed.total(tokens, ctx)
        dt = time.perf_counter() - t0
        self.tokens_total += tokens
        row = {
            "kind": "train",
            "step": step,
            **opt,
            "tokens": tokens,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "peak_mem_mb": peak_memory_mb(run.device),
        }
        if self.thought_len_at(step) is not None:
            row["thought_len"] = run.qs.config.thought_len
        self.last_row = row
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            run.log(row)
        return row

    def progress_postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{row.get('loss', 0):.3g}",
            "base": f"{row.get('base_nll', 0):.3f}",
            "mixed": f"{row.get('mixed_nll', float('nan')):.3f}",
            "tok_s": f"{row['tokens_per_s']:.0f}",
        }

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, run: Run, step: int) -> dict[str, Any] | None:
        """Held-out NLL (and lm-eval tasks when due). The main process evaluates (under FSDP all
        of them compute, since each holds a shard); every process gets the result (Ray Train
        reports it from all workers)."""
        cfg, ctx = run.cfg, run.ctx
        row: dict[str, float] = {}
        if ctx.main or run.fsdp:
            with run.autocast:
                if self.val_windows:
                    per_token: dict[str, list[list[float]]] = {}
                    row.update(
                        heldout_nll(
                            run.qs,
                            self.val_windows,
                            cfg.eval.batch_size,
                            run.device,
                            think=self.thinks,
                            per_token=per_token,
                        )
                    )
                    if ctx.main:
                        write_json(run.run_dir / "heldout" / f"step_{step}.json", per_token)
                if cfg.eval.tasks and tasks_due(cfg, step) and not run.fsdp:
                    row.update(self._tasks(run, step))
                if cfg.eval.qa and not run.fsdp:
                    row.update(self._qa(run, step))
            if run.tracker is not None:
                row.update(run.tracker.changed())
        row = distributed.broadcast(row, ctx)
        return {"kind": "eval", "step": step, **row} if row else None

    def _qa(self, run: Run, step: int) -> dict[str, float]:
        """Held-out chain-of-thought accuracy (``eval.qa``), thinking while it writes if
        ``qa.think``, and with ``eval.tasks_both`` also without thinking
        (``eval/qa_acc:nothink...``). At step 0 the zero-initialised mixing head makes both
        equal, so only the plain answers are computed there."""
        cfg = self.cfg
        questions = load_examples(cfg.qa, cfg.data.data_dir, held_out=True)
        questions = questions[: cfg.qa.eval_questions]
        plain = dataclasses.replace(cfg.qa, think=False)
        think = cfg.qa.think and self.thinks and step > 0
        row = qa_accuracy(run.qs, cfg.qa if think else plain, questions, cfg.logging.progress)
        if think and cfg.eval.tasks_both:
            other = qa_accuracy(run.qs, plain, questions, cfg.logging.progress)
            row.update({k.replace("eval/qa_", "eval/qa:nothink_"): v for k, v in other.items()})
        return row

    def _tasks(self, run: Run, step: int) -> dict[str, float]:
        cfg = run.cfg
        samples = run.run_dir / "tasks" / f"step_{step}" if run.ctx.main else None
        plain = not self.thinks
        row = task_metrics(run.qs, cfg, self.thinks, samples, plain=plain)
        if self.thinks and cfg.eval.tasks_both and step > 0:
            # at step 0 the zero-initialised mixing head makes both modes equal
            row.update(task_metrics(run.qs, cfg, False, samples, plain=plain))
        return row

    # ------------------------------------------------------------------ the end
    def summary(self, run: Run) -> dict[str, Any]:
        evals = [r for r in run.rows() if r.get("kind") == "eval"] if run.ctx.main else []
        elapsed = time.perf_counter() - run.t_start
        return {
            "steps": self.cfg.train.steps,
            "tokens_per_s": self.tokens_total / elapsed if elapsed else None,
            "final": {k: v for k, v in self._last_train(run).items() if k != "kind"},
            "eval_first": _figures(evals[0]) if evals else None,
            "eval_last": _figures(evals[-1]) if evals else None,
        }

    def _last_train(self, run: Run) -> dict[str, Any]:
        if self.last_row:
            return self.last_row
        trains = [r for r in run.rows() if r.get("kind") == "train"] if run.ctx.main else []
        return trains[-1] if trains else {}

    def after(
        self, run_dir: Path, summary: dict[str, Any], ctx: distributed.Context
    ) -> dict[str, Any]:
        cfg = self.cfg
        if (
            summary.get("final_model")
            and cfg.eval.tasks
            and distributed.sharded(ctx, cfg.train.parallel)
        ):
            summary = final_task_eval(cfg, run_dir, summary, self.thinks)
        return summary

    @staticmethod
    def format_summary(summary: dict[str, Any]) -> str:
        f = summary.get("final", {})
        nan = float("nan")
        lines = [
            f"run directory   {summary['run_dir']}",
            f"steps           {summary['steps']}"
            + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""),
            f"time            {summary['seconds']:.1f} s, {summary['tokens_per_s'] or 0:.0f} "
            f"tokens/s, peak memory {summary['peak_mem_mb']:.0f} MB",
            f"last step       loss {f.get('loss', nan):.4g}  base NLL {f.get('base_nll', nan):.4f}  "
            f"mixed NLL {f.get('mixed_nll', nan):.4f}  policy {f.get('policy_loss', nan):.3g}  "
            f"reward {f.get('reward_mean', nan):.3g}  mixing w {f.get('mixing_weight_mean', nan):.3g}",
        ]
        for name, ev in (
            ("held-out before", summary.get("eval_first")),
            ("held-out after", summary.get("eval_last")),
        ):
            if ev and "eval/nll_base" in ev:
                text = f"NLL without thoughts {ev['eval/nll_base']:.4f}"
                if "eval/nll_thought" in ev:
                    text += (
                        f", with thoughts {ev['eval/nll_thought']:.4f} "
                        f"(delta {ev['eval/nll_delta']:+.4f})"
                    )
                lines.append(f"{name:15} {text}")
        lines.append(f"final model     {summary['final_model']}")
        return "\n".join(lines)


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("kind", "step")}


def final_task_eval(
    cfg: RunConfig, run_dir: Path, summary: dict[str, Any], thinks: bool
) -> dict[str, Any]:
    """``eval.tasks`` of a sharded run: no process holds the whole model while training, so the
    main process scores the tasks on the gathered ``final/`` model once training is over (the
    other processes have left). Logged as an evaluation row at the last step."""
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    qs = QuietStar.from_pretrained(summary["final_model"], dtype=model_dtype(cfg)).to(device)
    step = cfg.train.steps
    samples = run_dir / "tasks" / f"step_{step}"
    with autocast_for(cfg, device):
        row = task_metrics(qs, cfg, thinks, samples, plain=not thinks)
        if thinks and cfg.eval.tasks_both:
            row.update(task_metrics(qs, cfg, False, samples, plain=not thinks))
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
    try:
        logger.log({"kind": "eval", "step": step, **row})
    finally:
        logger.close()
    summary["eval_last"] = {**(summary.get("eval_last") or {}), **row}
    write_summary(run_dir, summary)
    return summary


register(Method("quiet_star", QuietStarRecipe, "Quiet-STaR", (("quiet_star", QuietStarSection),)))
