"""TRICE (Hoffman et al. 2023, "Training Chain-of-Thought via Latent-Variable Inference") as a
recipe: ``train.method=trice`` with the ``qa`` and ``trice`` config sections and
``train.steps``.

TRICE maximises the marginal likelihood of the correct answer, treating the rationale as a
latent variable, by MCMC-EM. Setup: ``qa.questions`` training questions, each with a *memory*
of one rationale whose answer is correct, initialised by hinted sampling (the rationalisation
prompt of STaR, the hint dropped from what is scored), then by one plain sample for those still
empty. One step: ``train.batch_size`` questions (a seeded draw); the current model *proposes* a
rationale for each (at ``qa.temperature``: 1.0 keeps the proposal the model's own
distribution, which the control variate needs); a correct proposal replaces the memory; the
gradient is :func:`qstar.core.selftaught.trice_surrogate`'s: ``(1/B) sum_i m_i [grad log p(r_i
| x_i) - beta_i grad log p(z'_i | x_i)]`` with the leave-one-out ``beta_i`` (``beta = 0`` with
``trice.control_variate=false``). Rationales are sampled and scored under the same prompt
(``qa.shots`` worked examples, then the question).

Logged per step: ``accept_rate`` (correct proposals), ``memory_coverage`` (questions with a
correct rationale in memory), ``contributing`` (of the batch). Every ``eval.every`` steps (and
at the end): held-out accuracy as in STaR and a checkpoint with the memory; each step is
seeded by ``train.seed`` and its number, so a resumed run equals an uninterrupted one. Several
processes share each step's questions (memory updates are exchanged after every step).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from qstar.core import selftaught
from qstar.core.model import QuietStar
from qstar.qa import answers, check_sources, format_prompt, load_examples, shots_for
from qstar.qa.sampling import qa_accuracy, sample_rationales
from qstar.qa.scoring import completion_batch, completion_logprobs
from qstar.recipes.base import Recipe
from qstar.recipes.registry import Method, register
from qstar.recipes.star import accuracy_lines, final_tasks, strip_eval
from qstar.run_config import QASection, TriceSection
from qstar.runs import distributed
from qstar.runs.state import Run
from qstar.runs.step import optimizer_step


def init_memory(run: Run, questions: list, seed: int) -> dict[str, str]:
    """One correct rationale per question where hinted, then plain, sampling finds one."""
    qa = run.cfg.qa
    shots = shots_for(qa.task)[: qa.shots]
    memory: dict[str, str] = {}
    for attempt, hinted in enumerate((True, False)):
        todo = [q for q in questions if q.id not in memory]
        if not todo:
            break
        prompts = [format_prompt(q, shots, hint=q.answer if hinted else None) for q in todo]

        def fn(part: list[str], attempt: int = attempt) -> list[str]:
            return sample_rationales(
                run.qs,
                part,
                qa.max_new_tokens,
                qa.temperature,
                qa.think,
                seed + attempt,
                qa.generation_batch,
                progress="initialise memory" if run.cfg.logging.progress else None,
            )

        with torch.no_grad(), run.autocast:
            texts = distributed.shard_map(fn, prompts, run.ctx, replicated=not run.fsdp)
        for q, t in zip(todo, texts, strict=True):
            if answers.is_correct(q, t) and "hint" not in t.lower():
                memory[q.id] = t
    return memory


def trice_step(
    run: Run, batch: list, memory: dict[str, str], seed: int, control_variate: bool = True
) -> tuple[dict[str, float], dict[str, str]]:
    """Propose, update the memory, and accumulate the gradient of ``-trice_surrogate``.
    Returns the figures and the memory updates (correct proposals by question id)."""
    qa = run.cfg.qa
    qs = run.qs
    shots = shots_for(qa.task)[: qa.shots]
    prompts = [format_prompt(q, shots) for q in batch]
    with torch.no_grad(), run.autocast:
        qs.eval()
        proposals = sample_rationales(
            qs, prompts, qa.max_new_tokens, qa.temperature, qa.think, seed, qa.generation_batch
        )
    correct = [answers.is_correct(q, z) for q, z in zip(batch, proposals, strict=True)]
    updates = {q.id: z for q, z, c in zip(batch, proposals, correct, strict=True) if c}
    memory.update(updates)
    contributes = [q.id in memory for q in batch]
    qs.train()
    # score the proposals, and the memories that differ from them, in one batch
    rows = [{"prompt": p, "target": z} for p, z in zip(prompts, proposals, strict=True)]
    stale = [i for i, q in enumerate(batch) if contributes[i] and not correct[i]]
    rows += [{"prompt": prompts[i], "target": memory[batch[i].id]} for i in stale]
    ids, mask, cmask = completion_batch(qs.tokenizer, rows, run.device)
    with run.autocast:
        logp = completion_logprobs(run.model, ids, mask, cmask)  # (B + len(stale),)
    B = len(batch)
    logp_proposal = logp[:B]
    logp_memory = logp_proposal.clone()
    if stale:
        logp_memory = logp_memory.index_put((torch.tensor(stale, device=run.device),), logp[B:])
    c = torch.tensor(correct, device=run.device)
    m = torch.tensor(contributes, device=run.device)
    if not control_variate:  # the plain estimator: the proposal's score carries no weight
        c = torch.zeros_like(c)
    objective = selftaught.trice_surrogate(logp_memory, logp_proposal, c, m)
    (-objective / run.accum).backward()  # the step's gradient: the mean over its micro-batches
    figures = {
        "loss": float(-objective.detach()),
        "accept_rate": float(torch.tensor(correct, dtype=torch.float).mean()),
        "contributing": float(m.float().mean()),
        "proposal_logp": float(logp_proposal.detach().mean()),
        "tokens": int(cmask.sum()),
    }
    return figures, updates


class TriceRecipe(Recipe):
    """TRICE: a step is one optimiser step over ``train.batch_size`` questions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pool: list = []
        self.eval_q: list = []
        self.memory: dict[str, str] = {}

    def check(self) -> None:
        check_sources(self.cfg.qa)

    def prepare(self, qs: QuietStar, ctx) -> dict[str, Any]:
        cfg = self.cfg
        train_all = load_examples(cfg.qa, cfg.data.data_dir)
        self.pool = random.Random(cfg.train.seed).sample(
            train_all, min(cfg.qa.questions, len(train_all))
        )
        self.eval_q = load_examples(cfg.qa, cfg.data.data_dir, held_out=True)[
            : cfg.qa.eval_questions
        ]
        qs.eval()
        return {
            "data": cfg.qa.source or cfg.qa.task,
            "train_questions": len(self.pool),
            "eval_questions": len(self.eval_q),
        }

    def begin(self, run: Run) -> None:
        self.memory = init_memory(run, self.pool, self.cfg.train.seed * 1_000_003)

    def checkpoint_due(self, step: int) -> bool:
        return super().checkpoint_due(step) or self.eval_due(step)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = dict(state["memory"])

    def coverage(self) -> float:
        return len(self.memory) / max(len(self.pool), 1)

    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        cfg, ctx = self.cfg, run.ctx
        t0 = time.perf_counter()
        seed = cfg.train.seed * 1_000_003 + step
        batch = random.Random(seed).sample(self.pool, min(cfg.train.batch_size, len(self.pool)))
        micro = cfg.train.micro_batch_size
        parts: dict[str, float] = {}
        updates: dict[str, str] = {}
        for j in range(run.accum):
            k = j * ctx.world + ctx.rank  # this process's micro-batch, the same split everywhere
            part = batch[k * micro : (k + 1) * micro]
            if not part:
                continue
            got, new = trice_step(run, part, self.memory, seed * 31 + k, cfg.trice.control_variate)
            updates.update(new)
            for key, value in got.items():
                parts[key] = parts.get(key, 0.0) + value / run.accum
        for other in distributed.gather(updates, ctx):  # every process's correct proposals
            self.memory.update(other)
        opt = optimizer_step(run, parts, step)
        run.qs.eval()
        row = {
            "kind": "train",
            "step": step,
            **opt,
            "memory_coverage": self.coverage(),
            "step_s": time.perf_counter() - t0,
        }
        run.log(row)
        return row

    def evaluate(self, run: Run, step: int) -> dict[str, Any] | None:
        row: dict[str, float] = {}
        if run.ctx.main or run.fsdp:
            with torch.no_grad(), run.autocast:
                row = qa_accuracy(run.qs, self.cfg.qa, self.eval_q, self.cfg.logging.progress)
        row = distributed.broadcast(row, run.ctx)
        extra = {"memory_coverage": self.coverage()} if step == 0 else {}
        return {"kind": "eval", "step": step, **extra, **row}

    def summary(self, run: Run) -> dict[str, Any]:
        rows = run.rows() if run.ctx.main else []
        evals = [r for r in rows if r.get("kind") == "eval"]
        trains = [r for r in rows if r.get("kind") == "train"]
        return {
            "steps": self.cfg.train.steps,
            "accept_rate": sum(r["accept_rate"] for r in trains) / max(len(trains), 1),
            "memory_coverage": self.coverage(),
            "eval_first": strip_eval(evals[0]) if evals else None,
            "eval_last": {**(strip_eval(evals[-1]) if evals else {}), **final_tasks(run)},
        }

    @staticmethod
    def report_figures(summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "accept rate": summary.get("accept_rate"),
            "memory coverage": summary.get("memory_coverage"),
        }

    @staticmethod
    def format_summary(summary: dict[str, Any]) -> str:
        lines = [
            f"run directory   {summary['run_dir']}",
            f"steps           {summary['steps']} ({summary['seconds']:.1f} s, peak memory "
            f"{summary['peak_mem_mb']:.0f} MB)",
            f"acceptance      {summary['accept_rate']:.3f} of proposals correct; memory covers "
            f"{summary['memory_coverage']:.3f} of the questions",
        ]
        lines += accuracy_lines(summary)
        lines.append(f"final model     {summary['final_model']}")
        return "\n".join(lines)


register(Method("trice", TriceRecipe, "TRICE", (("qa", QASection), ("trice", TriceSection))))
