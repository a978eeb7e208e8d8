"""V-STaR (Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners") as a
recipe: ``train.method=vstar`` with the ``star`` config section.

1. **Generator**: STaR's iterations (:func:`qstar.recipes.star.train_star`) with ``star.samples``
   solutions sampled per question (STaR samples one), keeping every incorrect first sample as
   well (``iterations/iter_N/rejected.jsonl``).
2. **Verifier**: the *base* model trained with DPO (:func:`qstar.core.selftaught.dpo_loss`,
   ``star.dpo_beta``; the frozen base model is the reference) on (correct, incorrect) pairs of
   solutions to the same question, from every iteration, for ``star.verifier_steps`` steps of
   ``train.batch_size`` pairs. Rationalised solutions are not used as positives (they were
   written with the answer in view). Saved under ``verifier/``.
3. **Inference**: for each held-out question the generator samples ``star.samples`` solutions at
   ``star.temperature``; the verifier scores each by DPO's implicit reward ``beta (log
   p_verifier - log p_ref)`` and the best one is the answer. Logged beside it, on the same
   samples: majority vote and pass@1 (the mean accuracy of a single sample), and the greedy
   accuracy of STaR (``eval/qa_acc``).

TRL's ``DPOTrainer`` is not used: it is a ``transformers.Trainer`` with its own loop, data
pipeline and checkpoints, where every qstar recipe owns its loop, run directory and resume. The
loss is the same sigmoid DPO loss (tested against TRL's where it is installed,
``tests/test_selftaught.py``).

Run directory: STaR's, plus ``pairs.jsonl``, ``verifier/`` (with ``done.json`` once trained;
a resumed run skips what is done) and the V-STaR figures in ``summary.json``.
"""

from __future__ import annotations

import json
import random
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
from qstar.recipes.rundir import write_json
from qstar.recipes.tracking import MetricsLogger, read_metrics
from qstar.run_config import RunConfig


def preference_pairs(run_dir: Path, seed: int) -> list[dict]:
    """(correct, incorrect) solution pairs of the same question from every iteration: each
    incorrect solution is paired with one correct, non-rationalised solution of its question
    (drawn with a seeded generator)."""
    good: dict[str, list[dict]] = {}
    bad: list[dict] = []
    for it in sorted((run_dir / "iterations").glob("iter_*"), key=lambda p: int(p.name[5:])):
        for line in (it / "kept.jsonl").read_text().splitlines():
            row = json.loads(line)
            if not row.get("rationalized"):
                good.setdefault(row["id"], []).append(row)
        if (it / "rejected.jsonl").is_file():
            bad += [json.loads(line) for line in (it / "rejected.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    return [
        {
            "prompt": b["prompt"],
            "chosen": rng.choice(good[b["id"]])["target"],
            "rejected": b["target"],
        }
        for b in bad
        if b["id"] in good
    ]


def _logps(qs: QuietStar, prompts: list[str], targets: list[str], device) -> torch.Tensor:
    ids, mask, cmask = star._batch(
        qs.tokenizer,
        [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)],
        device,
    )
    return star.completion_logprobs(qs, ids, mask, cmask)


def train_verifier(
    cfg: RunConfig, pairs: list[dict], device, log: Callable[[dict[str, Any]], None], autocast
) -> tuple[QuietStar, QuietStar]:
    """DPO from the base model on ``pairs``; returns ``(verifier, reference)``."""
    reference = build_model(cfg, device).eval()
    verifier = build_model(cfg, device)
    if not pairs or cfg.star.verifier_steps == 0:
        return verifier.eval(), reference
    params = [p for p in verifier.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    rng = random.Random(cfg.train.seed)
    order: list[int] = []
    micro = cfg.train.micro_batch_size
    accum = cfg.train.batch_size // micro
    verifier.train()
    for step in range(1, cfg.star.verifier_steps + 1):
        t0 = time.perf_counter()
        parts = {"dpo_loss": 0.0, "reward_margin": 0.0, "pair_acc": 0.0}
        for _ in range(accum):
            batch = []
            while len(batch) < micro:
                if not order:
                    order = list(range(len(pairs)))
                    rng.shuffle(order)
                batch.append(pairs[order.pop()])
            prompts = [b["prompt"] for b in batch]
            with autocast:
                with torch.no_grad():
                    ref_c = _logps(reference, prompts, [b["chosen"] for b in batch], device)
                    ref_r = _logps(reference, prompts, [b["rejected"] for b in batch], device)
                pol_c = _logps(verifier, prompts, [b["chosen"] for b in batch], device)
                pol_r = _logps(verifier, prompts, [b["rejected"] for b in batch], device)
            loss, r_c, r_r = selftaught.dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.star.dpo_beta)
            (loss / accum).backward()
            parts["dpo_loss"] += float(loss.detach()) / accum
            parts["reward_margin"] += float((r_c - r_r).mean()) / accum
            parts["pair_acc"] += float((r_c > r_r).float().mean()) / accum
        if not torch.isfinite(torch.tensor(parts["dpo_loss"])):
            raise TrainingDiverged(
                f"V-STaR verifier diverged at step {step}: non-finite DPO loss; lower optim.lr"
            )
        grad_norm, _ = star.optimizer_step(params, optimizer, scheduler, cfg.optim.grad_clip)
        log(
            {
                "kind": "verifier",
                "step": step,
                **parts,
                "grad_norm": float(grad_norm),
                "step_s": time.perf_counter() - t0,
            }
        )
    return verifier.eval(), reference


@torch.no_grad()
def best_of_k_eval(
    generator: QuietStar, verifier: QuietStar, reference: QuietStar, cfg: RunConfig, questions: list
) -> dict[str, float]:
    """Best-of-k by the verifier, majority vote and pass@1 on the same ``k`` samples each."""
    import qstar.qa as qa

    s = cfg.star
    if not questions:
        return {}
    k = s.samples
    shots = qa.shots_for(s.task)[: s.shots]
    prompts = [qa.format_prompt(q, shots) for q in questions for _ in range(k)]
    texts = star.sample_rationales(
        generator,
        prompts,
        s.max_new_tokens,
        s.temperature,
        s.think,
        cfg.train.seed + 7,
        s.generation_batch,
        progress=f"{k} samples a question" if cfg.logging.progress else None,
    )
    plain = [qa.format_prompt(q, []) for q in questions for _ in range(k)]
    device = next(verifier.parameters()).device
    scores = []
    for lo in range(0, len(texts), s.generation_batch):
        p, t = plain[lo : lo + s.generation_batch], texts[lo : lo + s.generation_batch]
        scores.append(
            selftaught.verifier_score(
                _logps(verifier, p, t, device), _logps(reference, p, t, device), s.dpo_beta
            )
        )
    score = torch.cat(scores).view(len(questions), k).float()
    correct = torch.tensor(
        [qa.is_correct(q, texts[i * k + j]) for i, q in enumerate(questions) for j in range(k)]
    ).view(len(questions), k)
    votes = [
        qa.majority([qa.extract_answer(s.task, texts[i * k + j]) for j in range(k)])
        for i in range(len(questions))
    ]
    maj = [
        v is not None and qa.is_correct(q, f"The answer is {v}.")
        for q, v in zip(questions, votes, strict=True)
    ]
    return {
        f"eval/vstar_best_of_{k}": selftaught.best_of_k(score, correct),
        f"eval/maj_at_{k}": sum(maj) / len(maj),
        "eval/pass_at_1": float(correct.float().mean()),
    }


def train_vstar(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_eval: Callable[[int, dict[str, Any], Path | None], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) V-STaR; returns the summary. ``stop_after`` stops after that generator
    iteration, as in STaR."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    gen = star.train_star(cfg, run_dir, resume, stop_after, on_eval, finish=False)
    if "stopped_at" in gen:
        return gen
    generator: QuietStar = gen["model"]
    device = pick_device(cfg.train.device)
    autocast = autocast_for(cfg, device)
    pairs = preference_pairs(run_dir, cfg.train.seed)
    with (run_dir / "pairs.jsonl").open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p) + "\n")
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
    metrics = run_dir / "metrics.jsonl"
    try:
        done = run_dir / "verifier" / "done.json"
        if done.is_file():  # a resumed run: the verifier is trained already
            verifier = QuietStar.from_pretrained(run_dir / "verifier").to(device).eval()
            reference = build_model(cfg, device).eval()
        else:
            logger.close()  # drop verifier rows of an interrupted attempt
            rows = [r for r in read_metrics(metrics) if r.get("kind") != "verifier"]
            metrics.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            logger = MetricsLogger(run_dir, cfg.logging.tensorboard, False)
            verifier, reference = train_verifier(cfg, pairs, device, logger.log, autocast)
            verifier.save_pretrained(run_dir / "verifier")
            write_json(done, {"pairs": len(pairs), "steps": cfg.star.verifier_steps})
        eval_q = star.load_examples(cfg, held_out=True)[: cfg.star.eval_questions]
        with autocast:
            figures = best_of_k_eval(generator, verifier, reference, cfg, eval_q)
        step = gen["steps"]
        logger.log({"kind": "eval", "step": step, "iteration": cfg.star.iterations, **figures})
        if on_eval is not None:  # with the generator's last greedy accuracy: every result has it
            qa_rows = [r for r in read_metrics(metrics) if "eval/qa_acc" in r]
            last_qa = star.strip_eval(qa_rows[-1]) if qa_rows else {}
            on_eval(step, {"kind": "eval", "step": step, **last_qa, **figures}, None)
    finally:
        logger.close()
    with autocast:
        tasks = star.final_tasks(generator, cfg, run_dir)
    final_dir = generator.save_pretrained(run_dir / "final")
    rows = read_metrics(metrics)
    evals = [r for r in rows if r.get("kind") == "eval" and "eval/qa_acc" in r]
    verif = [r for r in rows if r.get("kind") == "verifier"]
    summary = {
        "run_dir": str(run_dir),
        "method": "vstar",
        "iterations": cfg.star.iterations,
        "steps": gen["steps"],
        "resumed_from": gen["resumed_from"],
        "seconds": time.perf_counter() - t_start,
        "peak_mem_mb": peak_memory_mb(device),
        "per_iteration": star.per_iteration(rows),
        "pairs": len(pairs),
        "verifier_pair_acc": verif[-1]["pair_acc"] if verif else None,
        "eval_first": star.strip_eval(evals[0]) if evals else None,
        "eval_last": {**(star.strip_eval(evals[-1]) if evals else {}), **figures, **tasks},
        "final_model": str(final_dir),
        "verifier": str(run_dir / "verifier"),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = star.format_summary({**summary}).splitlines()[:-1]
    acc = summary["verifier_pair_acc"]
    lines.append(
        f"verifier        {summary['pairs']} preference pairs"
        + (f", last-step pair accuracy {acc:.3f}" if acc is not None else " (not trained)")
    )
    lines.append(f"final model     {summary['final_model']} (verifier: {summary['verifier']})")
    return "\n".join(lines)
