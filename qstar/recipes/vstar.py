"""V-STaR (Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners") as a
recipe: ``train.method=vstar`` with the ``qa``, ``star`` and ``vstar`` config sections.

1. **Generator**: STaR's iterations (:class:`qstar.recipes.star.StarRecipe`) with
   ``vstar.samples`` solutions sampled per question (STaR samples one), keeping every incorrect
   first sample as well (``iterations/iter_N/rejected.jsonl``).
2. **Verifier** (the step after the last iteration): the *base* model trained with DPO
   (:func:`qstar.core.selftaught.dpo_loss`, ``vstar.dpo_beta``; the frozen base model is the
   reference) on (correct, incorrect) pairs of solutions to the same question, from every
   iteration, for ``vstar.verifier_steps`` steps of ``train.batch_size`` pairs. Rationalised
   solutions are not used as positives (they were written with the answer in view). Saved
   under ``verifier/``.
3. **Inference**: for each held-out question the generator samples ``vstar.samples`` solutions
   at ``qa.temperature``; the verifier scores each by DPO's implicit reward ``beta (log
   p_verifier - log p_ref)`` and the best one is the answer. Logged beside it, on the same
   samples: majority vote and pass@1 (the mean accuracy of a single sample), and the greedy
   accuracy of STaR (``eval/qa_acc``).

TRL's ``DPOTrainer`` is not used: it is a ``transformers.Trainer`` with its own loop, data
pipeline and checkpoints, where every qstar recipe runs in the shared loop. The loss is the
same sigmoid DPO loss (tested against TRL's where it is installed, ``tests/test_selftaught.py``).
"""

from __future__ import annotations

import copy
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
from qstar.qa import answers, extract_answer, format_prompt, format_target, majority, shots_for
from qstar.qa.sampling import sample_rationales
from qstar.qa.scoring import completion_batch, completion_loss, score_texts
from qstar.recipes.registry import Method, register
from qstar.recipes.star import (
    StarRecipe,
    final_tasks,
    iteration_figures,
    per_iteration,
    strip_eval,
)
from qstar.run_config import QASection, RunConfig, StarSection, VStarSection
from qstar.runs import distributed
from qstar.runs.build import build_model, build_optimizer
from qstar.runs.rundir import write_json
from qstar.runs.state import Run


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


def gold_rows(cfg: RunConfig, questions: list) -> list[dict]:
    """The training questions' gold solutions as fine-tuning rows (in ``star.train_format``);
    none for a data set without worked solutions (CommonsenseQA)."""
    shots = shots_for(cfg.qa.task)[: cfg.qa.shots] if cfg.star.train_format == "sampled" else []
    return [
        {"prompt": format_prompt(q, shots), "target": format_target(q.rationale, q.answer)}
        for q in questions
        if q.rationale
    ]


def supervised(model: QuietStar, cfg: RunConfig, rows: list[dict], steps: int, autocast) -> int:
    """``steps`` AdamW steps of next-token NLL on ``rows``' targets (cycled in a seeded order);
    the steps taken (0 without rows)."""
    if not rows or not steps:
        return 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    rng, order = random.Random(cfg.train.seed + 11), []
    micro = cfg.train.micro_batch_size
    accum = cfg.train.batch_size // micro
    device = next(model.parameters()).device
    model.train()
    for _ in range(steps):
        for _ in range(accum):
            batch = []
            while len(batch) < micro:
                if not order:
                    order = list(range(len(rows)))
                    rng.shuffle(order)
                batch.append(rows[order.pop()])
            ids, mask, cmask = completion_batch(model.tokenizer, batch, device)
            with autocast:
                loss = completion_loss(model, ids, mask, cmask)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return steps


def train_verifier(
    cfg: RunConfig,
    pairs: list[dict],
    device,
    log: Callable[[dict[str, Any]], None],
    autocast,
    gold: list[dict] | None = None,
) -> tuple[QuietStar, QuietStar]:
    """DPO on ``pairs`` from the verifier's starting point: the model fine-tuned on the gold
    solutions ``gold`` (``vstar.verifier_init: sft``, the paper's; also the DPO reference) or the
    base model (``base``, or when there are no gold solutions); returns ``(verifier,
    reference)``."""
    reference = build_model(cfg, device)
    if cfg.vstar.verifier_init == "sft" and gold:
        supervised(reference, cfg, gold, cfg.vstar.sft_steps, autocast)
        log(
            {"kind": "verifier_sft", "step": 0, "sft_steps": cfg.vstar.sft_steps, "rows": len(gold)}
        )
    reference.eval().requires_grad_(False)
    verifier = copy.deepcopy(reference).requires_grad_(True)
    if not pairs or cfg.vstar.verifier_steps == 0:
        return verifier.eval(), reference
    params = [p for p in verifier.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    rng = random.Random(cfg.train.seed)
    order: list[int] = []
    micro = cfg.train.micro_batch_size
    accum = cfg.train.batch_size // micro
    verifier.train()
    for step in range(1, cfg.vstar.verifier_steps + 1):
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
            chosen, rejected = [b["chosen"] for b in batch], [b["rejected"] for b in batch]
            with autocast:
                with torch.no_grad():
                    ref_c = score_texts(reference, prompts, chosen)
                    ref_r = score_texts(reference, prompts, rejected)
                pol_c = score_texts(verifier, prompts, chosen)
                pol_r = score_texts(verifier, prompts, rejected)
            loss, r_c, r_r = selftaught.dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.vstar.dpo_beta)
            (loss / accum).backward()
            parts["dpo_loss"] += float(loss.detach()) / accum
            parts["reward_margin"] += float((r_c - r_r).mean()) / accum
            parts["pair_acc"] += float((r_c > r_r).float().mean()) / accum
        if not torch.isfinite(torch.tensor(parts["dpo_loss"])):
            raise TrainingDiverged(
                f"V-STaR verifier diverged at step {step}: non-finite DPO loss; lower optim.lr"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
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
    qa = cfg.qa
    if not questions:
        return {}
    k = cfg.vstar.samples
    shots = shots_for(qa.task)[: qa.shots]
    prompts = [format_prompt(q, shots) for q in questions for _ in range(k)]
    texts = sample_rationales(
        generator,
        prompts,
        qa.max_new_tokens,
        qa.temperature,
        qa.think,
        cfg.train.seed + 7,
        qa.generation_batch,
        progress=f"{k} samples a question" if cfg.logging.progress else None,
    )
    # the verifier scores a solution under the prompt it was trained on (star.train_format)
    scored = shots if cfg.star.train_format == "sampled" else []
    plain = [format_prompt(q, scored) for q in questions for _ in range(k)]
    scores = []
    for lo in range(0, len(texts), qa.generation_batch):
        p, t = plain[lo : lo + qa.generation_batch], texts[lo : lo + qa.generation_batch]
        scores.append(
            selftaught.verifier_score(
                score_texts(verifier, p, t), score_texts(reference, p, t), cfg.vstar.dpo_beta
            )
        )
    score = torch.cat(scores).view(len(questions), k).float()
    correct = torch.tensor(
        [answers.is_correct(q, texts[i * k + j]) for i, q in enumerate(questions) for j in range(k)]
    ).view(len(questions), k)
    votes = [
        majority([extract_answer(qa.task, texts[i * k + j]) for j in range(k)])
        for i in range(len(questions))
    ]
    maj = [
        v is not None and answers.is_correct(q, f"The answer is {v}.")
        for q, v in zip(questions, votes, strict=True)
    ]
    return {
        f"eval/vstar_best_of_{k}": selftaught.best_of_k(score, correct),
        f"eval/maj_at_{k}": sum(maj) / len(maj),
        "eval/pass_at_1": float(correct.float().mean()),
    }


class VStarRecipe(StarRecipe):
    """V-STaR: STaR's iterations as steps ``1..star.iterations``, then one step that trains
    the verifier and scores best-of-k."""

    def total_steps(self) -> int:
        return self.cfg.star.iterations + 1

    def questions(self, n: int) -> list:  # k solutions a question: the verifier's pairs
        return [q for q in super().questions(n) for _ in range(self.cfg.vstar.samples)]

    def training_data(self, run: Run, step: int, kept: list[dict]) -> list[dict]:
        """With ``vstar.accumulate`` (the paper's) the correct solutions of every iteration so
        far; else this iteration's."""
        if not self.cfg.vstar.accumulate:
            return kept
        earlier: list[dict] = []
        if run.ctx.main:
            for n in range(1, step):
                path = run.run_dir / "iterations" / f"iter_{n}" / "kept.jsonl"
                earlier += [json.loads(x) for x in path.read_text().splitlines()]
        return distributed.broadcast(earlier, run.ctx) + kept

    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        if step <= self.cfg.star.iterations:
            return super().train_step(run, step)
        cfg = self.cfg
        pairs = preference_pairs(run.run_dir, cfg.train.seed) if run.ctx.main else []
        pairs = distributed.broadcast(pairs, run.ctx)
        if run.ctx.main:
            with (run.run_dir / "pairs.jsonl").open("w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(p) + "\n" for p in pairs)
        self.verifier, self.reference = train_verifier(
            cfg, pairs, run.device, run.log, run.autocast, gold_rows(cfg, self.train_q)
        )
        if run.ctx.main:
            self.verifier.save_pretrained(run.run_dir / "verifier")
            write_json(
                run.run_dir / "verifier" / "done.json",
                {"pairs": len(pairs), "steps": cfg.vstar.verifier_steps},
            )
        self.pairs = len(pairs)
        return {"kind": "verifier", "step": self.ft_steps, "pairs": len(pairs)}

    def evaluate(self, run: Run, step: int) -> dict[str, Any] | None:
        if step <= self.cfg.star.iterations:
            return super().evaluate(run, step)
        row: dict[str, float] = {}
        if run.ctx.main:
            with run.autocast:
                row = best_of_k_eval(run.qs, self.verifier, self.reference, self.cfg, self.eval_q)
            # with the generator's last greedy accuracy: every result of the run has it
            qa_rows = [r for r in run.rows() if "eval/qa_acc" in r]
            row = {**(strip_eval(qa_rows[-1]) if qa_rows else {}), **row}
        row = distributed.broadcast(row, run.ctx)
        return {"kind": "eval", "step": self.ft_steps, "iteration": self.cfg.star.iterations, **row}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pairs": getattr(self, "pairs", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pairs = state.get("pairs")

    def summary(self, run: Run) -> dict[str, Any]:
        rows = run.rows() if run.ctx.main else []
        qa_evals = [r for r in rows if r.get("kind") == "eval" and "eval/qa_acc" in r]
        best = [r for r in rows if r.get("kind") == "eval" and "eval/pass_at_1" in r]
        verif = [r for r in rows if r.get("kind") == "verifier" and "pair_acc" in r]
        figures = strip_eval(best[-1]) if best else {}
        return {
            "iterations": self.cfg.star.iterations,
            "steps": self.ft_steps,
            "per_iteration": per_iteration(rows),
            "pairs": self.pairs,
            "verifier_pair_acc": verif[-1]["pair_acc"] if verif else None,
            "eval_first": strip_eval(qa_evals[0]) if qa_evals else None,
            "eval_last": {
                **(strip_eval(qa_evals[-1]) if qa_evals else {}),
                **figures,
                **final_tasks(run),
            },
            "verifier": str(run.run_dir / "verifier"),
        }

    @staticmethod
    def report_figures(summary: dict[str, Any]) -> dict[str, Any]:
        row = {
            **iteration_figures(summary),
            "pairs": summary.get("pairs"),
            "verifier pair acc": summary.get("verifier_pair_acc"),
        }
        for key, value in (summary.get("eval_last") or {}).items():
            if key.startswith(("eval/vstar_best_of_", "eval/maj_at_", "eval/pass_at_1")):
                row[key[5:]] = value
        return row

    @staticmethod
    def format_summary(summary: dict[str, Any]) -> str:
        lines = StarRecipe.format_summary(summary).splitlines()[:-1]
        acc = summary["verifier_pair_acc"]
        lines.append(
            f"verifier        {summary['pairs']} preference pairs"
            + (f", last-step pair accuracy {acc:.3f}" if acc is not None else " (not trained)")
        )
        lines.append(f"final model     {summary['final_model']} (verifier: {summary['verifier']})")
        return "\n".join(lines)


register(
    Method(
        "vstar",
        VStarRecipe,
        "V-STaR",
        (("qa", QASection), ("star", StarSection), ("vstar", VStarSection)),
    )
)
