"""TRICE (Hoffman et al. 2023, "Training Chain-of-Thought via Latent-Variable Inference") as a
recipe: ``train.method=trice`` with the ``star`` config section and ``train.steps``.

TRICE maximises the marginal likelihood of the correct answer, treating the rationale as a
latent variable, by MCMC-EM. Setup: ``star.questions`` training questions, each with a *memory*
of one rationale whose answer is correct, initialised by hinted sampling (the rationalisation
prompt of STaR, the hint dropped from what is scored), then by one plain sample for those still
empty. One step: ``train.batch_size`` questions (a seeded draw); the current model *proposes* a
rationale for each (at ``star.temperature``: 1.0 keeps the proposal the model's own
distribution, which the control variate needs); a correct proposal replaces the memory; the
gradient is :func:`qstar.core.selftaught.trice_surrogate`'s: ``(1/B) sum_i m_i [grad log p(r_i
| x_i) - beta_i grad log p(z'_i | x_i)]`` with the leave-one-out ``beta_i``. Rationales are
sampled and scored under the same prompt (``star.shots`` worked examples, then the question).

Logged per step: ``accept_rate`` (correct proposals), ``memory_coverage`` (questions with a
correct rationale in memory), ``contributing`` (of the batch). Every ``eval.every`` steps (and
at the end): held-out accuracy as in STaR and a checkpoint (model, optimiser, schedule,
memory); each step is seeded by ``train.seed`` and its number, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qstar.core import selftaught
from qstar.core.model import QuietStar
from qstar.errors import TrainingDiverged
from qstar.recipes import star
from qstar.recipes.common import (
    autocast_for,
    build_model,
    build_optimizer,
    peak_memory_mb,
    pick_device,
)
from qstar.recipes.rundir import check_run_dir, write_json
from qstar.recipes.tracking import MetricsLogger, read_metrics, truncate_lines
from qstar.run_config import RunConfig


def init_memory(qs: QuietStar, cfg: RunConfig, questions: list, seed: int) -> dict[str, str]:
    """One correct rationale per question where hinted, then plain, sampling finds one."""
    import qstar.qa as qa

    s = cfg.star
    shots = qa.shots_for(s.task)[: s.shots]
    memory: dict[str, str] = {}
    for attempt, hinted in enumerate((True, False)):
        todo = [q for q in questions if q.id not in memory]
        if not todo:
            break
        texts = star.sample_rationales(
            qs,
            [qa.format_prompt(q, shots, hint=q.answer if hinted else None) for q in todo],
            s.max_new_tokens,
            s.temperature,
            s.think,
            seed + attempt,
            s.generation_batch,
            progress="initialise memory" if cfg.logging.progress else None,
        )
        for q, t in zip(todo, texts, strict=True):
            if qa.is_correct(q, t) and "hint" not in t.lower():
                memory[q.id] = t
    return memory


def trice_step(
    qs: QuietStar, cfg: RunConfig, batch: list, memory: dict[str, str], seed: int, autocast
) -> dict[str, float]:
    """Propose, update the memory, and accumulate the gradient of ``-trice_surrogate``."""
    import qstar.qa as qa

    s = cfg.star
    shots = qa.shots_for(s.task)[: s.shots]
    prompts = [qa.format_prompt(q, shots) for q in batch]
    with torch.no_grad(), autocast:
        qs.eval()
        proposals = star.sample_rationales(
            qs, prompts, s.max_new_tokens, s.temperature, s.think, seed, s.generation_batch
        )
    correct = [qa.is_correct(q, z) for q, z in zip(batch, proposals, strict=True)]
    for q, z, c in zip(batch, proposals, correct, strict=True):
        if c:
            memory[q.id] = z
    contributes = [q.id in memory for q in batch]
    qs.train()
    # score the proposals, and the memories that differ from them, in one batch
    rows = [{"prompt": p, "target": z} for p, z in zip(prompts, proposals, strict=True)]
    stale = [i for i, q in enumerate(batch) if contributes[i] and not correct[i]]
    rows += [{"prompt": prompts[i], "target": memory[batch[i].id]} for i in stale]
    device = next(qs.parameters()).device
    ids, mask, cmask = star._batch(qs.tokenizer, rows, device)
    with autocast:
        logp = star.completion_logprobs(qs, ids, mask, cmask)  # (B + len(stale),)
    B = len(batch)
    logp_proposal = logp[:B]
    logp_memory = logp_proposal.clone()
    if stale:
        logp_memory = logp_memory.index_put((torch.tensor(stale, device=device),), logp[B:])
    c = torch.tensor(correct, device=device)
    m = torch.tensor(contributes, device=device)
    objective = selftaught.trice_surrogate(logp_memory, logp_proposal, c, m)
    (-objective).backward()
    return {
        "loss": float(-objective.detach()),
        "accept_rate": float(c.float().mean()),
        "contributing": float(m.float().mean()),
        "proposal_logp": float(logp_proposal.detach().mean()),
        "tokens": int(cmask.sum()),
    }


def _finished_steps(run_dir: Path) -> list[int]:
    """Steps with a whole checkpoint (its ``state.json`` is written last), in order."""
    found = (run_dir / "checkpoints").glob("step_*/state.json")
    return sorted(int(p.parent.name.split("_")[1]) for p in found)


def _save(run_dir: Path, step: int, qs, optimizer, scheduler, memory, keep: int) -> Path:
    ckpt = run_dir / "checkpoints" / f"step_{step}"
    qs.save_pretrained(ckpt / "model")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        ckpt / "optimizer.pt",
    )
    write_json(ckpt / "memory.json", memory)
    write_json(ckpt / "state.json", {"step": step})  # written last: the checkpoint is whole
    for old in _finished_steps(run_dir)[:-keep]:
        shutil.rmtree(run_dir / "checkpoints" / f"step_{old}")
    return ckpt


def _latest(run_dir: Path) -> Path | None:
    done = _finished_steps(run_dir)
    return run_dir / "checkpoints" / f"step_{done[-1]}" if done else None


def train_trice(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[int, dict[str, Any], Path | None], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) TRICE; returns the summary. ``stop_after`` ends the run after that step
    (tests simulate an interruption with it)."""
    run_dir = Path(run_dir)
    star.check_sources(cfg)
    check_run_dir(run_dir, cfg, resume)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    qs = build_model(cfg, device)
    qs.eval()
    pool = random.Random(cfg.train.seed).sample(
        train_all := star.load_examples(cfg),
        min(cfg.star.questions, len(train_all)),
    )
    eval_q = star.load_examples(cfg, held_out=True)[: cfg.star.eval_questions]
    params = [p for p in qs.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    autocast = autocast_for(cfg, device)
    ckpt = _latest(run_dir) if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics = run_dir / "metrics.jsonl"
    start = 0
    if ckpt is not None:
        start = json.loads((ckpt / "state.json").read_text())["step"]
        qs.load_state_dict(QuietStar.from_pretrained(ckpt / "model").to(device).state_dict())
        state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        memory = json.loads((ckpt / "memory.json").read_text())
        keep = sum(1 for r in read_metrics(metrics) if r.get("step", 0) <= start)
        truncate_lines(metrics, keep)
        print(f"qstar: resuming TRICE after step {start}", file=sys.stderr)
    else:
        metrics.unlink(missing_ok=True)
        star.write_provenance(cfg, run_dir, qs, device, len(pool), len(eval_q))
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
    t_start = time.perf_counter()
    try:
        if ckpt is None:
            with torch.no_grad(), autocast:
                memory = init_memory(qs, cfg, pool, cfg.train.seed * 1_000_003)
                first = star.qa_accuracy(qs, cfg, eval_q)
            logger.log(
                {"kind": "eval", "step": 0, "memory_coverage": len(memory) / len(pool), **first}
            )
            if on_eval is not None:
                on_eval(0, {"kind": "eval", "step": 0, **first}, None)
        accum = cfg.train.batch_size // cfg.train.micro_batch_size
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            seed = cfg.train.seed * 1_000_003 + step
            batch = random.Random(seed).sample(pool, min(cfg.train.batch_size, len(pool)))
            parts: dict[str, float] = {}
            for j in range(accum):
                micro = batch[j * cfg.train.micro_batch_size : (j + 1) * cfg.train.micro_batch_size]
                if not micro:
                    continue
                got = trice_step(qs, cfg, micro, memory, seed * 31 + j, autocast)
                for key, value in got.items():
                    parts[key] = parts.get(key, 0.0) + value / accum
            if parts.get("loss") is not None and not torch.isfinite(torch.tensor(parts["loss"])):
                raise TrainingDiverged(
                    f"TRICE diverged at step {step}: non-finite surrogate loss; lower optim.lr"
                )
            grad_norm, lr = star.optimizer_step(params, optimizer, scheduler, cfg.optim.grad_clip)
            qs.eval()
            dt = time.perf_counter() - t0
            logger.log(
                {
                    "kind": "train",
                    "step": step,
                    **parts,
                    "memory_coverage": len(memory) / len(pool),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "step_s": dt,
                }
            )
            last = step == cfg.train.steps
            if last or (cfg.eval.every and step % cfg.eval.every == 0) or step == stop_after:
                with torch.no_grad(), autocast:
                    ev = star.qa_accuracy(qs, cfg, eval_q)
                row = {"kind": "eval", "step": step, **ev}
                logger.log(row)
                saved = _save(
                    run_dir, step, qs, optimizer, scheduler, memory, cfg.train.keep_checkpoints
                )
                if on_eval is not None:
                    on_eval(step, row, saved)
            if stop_after is not None and step >= stop_after:
                return {"stopped_at": step, "run_dir": str(run_dir)}
    finally:
        logger.close()
    with torch.no_grad(), autocast:
        tasks = star.final_tasks(qs, cfg, run_dir)
    final_dir = qs.save_pretrained(run_dir / "final")
    rows = read_metrics(metrics)
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]
    summary = {
        "run_dir": str(run_dir),
        "method": "trice",
        "steps": cfg.train.steps,
        "resumed_from": start or None,
        "seconds": time.perf_counter() - t_start,
        "peak_mem_mb": peak_memory_mb(device),
        "accept_rate": sum(r["accept_rate"] for r in trains) / max(len(trains), 1),
        "memory_coverage": len(memory) / len(pool),
        "eval_first": star.strip_eval(evals[0]) if evals else None,
        "eval_last": {**(star.strip_eval(evals[-1]) if evals else {}), **tasks},
        "final_model": str(final_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"run directory   {summary['run_dir']}",
        f"steps           {summary['steps']} ({summary['seconds']:.1f} s, peak memory "
        f"{summary['peak_mem_mb']:.0f} MB)",
        f"acceptance      {summary['accept_rate']:.3f} of proposals correct; memory covers "
        f"{summary['memory_coverage']:.3f} of the questions",
    ]
    lines += star.accuracy_lines(summary)
    lines.append(f"final model     {summary['final_model']}")
    return "\n".join(lines)
