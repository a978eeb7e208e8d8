"""TRICE (Hoffman et al. 2023, "Training Chain-of-Thought via Latent-Variable Inference") as a
recipe: ``train.method=trice`` with the ``qa`` and ``trice`` config sections and
``train.steps``.

TRICE maximises the marginal likelihood of the correct answer, treating the rationale as a
latent variable, by MCMC-EM. Setup: ``qa.questions`` training questions, each with a *memory*
of one rationale whose answer is correct, initialised by hinted sampling (the rationalisation
prompt of STaR, the hint dropped from what is scored), then by one plain sample for those still
empty (a rationalisation counts only if its reasoning reaches the answer). One step:
``train.batch_size`` questions (a seeded draw); the current model *proposes* a rationale for
each (``qa.temperature`` must be 1 and ``qa.think`` false: the proposal must be the model's own
distribution for the control variate); a correct proposal replaces the memory; the
gradient is :func:`qstar.core.selftaught.trice_surrogate`'s: ``(1/B) sum_i m_i [grad log p(r_i
| x_i) - beta_i grad log p(z'_i | x_i)]`` with the leave-one-out ``beta_i`` (``beta = 0`` with
``trice.control_variate=false``), taken over the whole batch (a step accumulates the surrogate
micro-batch by micro-batch; the control variate stays the batch's, so it is on even with
micro-batches of one question). A rationale is scored on exactly the token ids that were
sampled (up to EOS or the end of the stop string; nothing re-tokenised or appended), under the
prompt it was proposed with (``qa.shots`` worked examples, then the question); the memory's
rationale (sampled at an earlier step, or with the hint at initialisation) is scored under the
same plain prompt. A question whose memory is still empty (no correct rationale found yet)
contributes nothing to the gradient and does not count in the other questions' leave-one-out
rate (Hoffman et al. 2023: the gradient is over examples with a rationale in memory).

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
from qstar.qa.scoring import completion_batch_ids, completion_logprobs, pad_of
from qstar.recipes.base import Recipe
from qstar.recipes.registry import Method, register
from qstar.recipes.star import accuracy_lines, final_tasks, sample_shared, strip_eval
from qstar.run_config import QASection, TriceSection
from qstar.runs import distributed
from qstar.runs.state import Run
from qstar.runs.step import optimizer_step


def _sample(run: Run, prompts: list[str], seed: int, what: str | None = None):
    """``(text, sampled token ids)`` per prompt at ``qa.temperature``, without gradient."""
    qa = run.cfg.qa
    with torch.no_grad(), run.autocast:
        return sample_rationales(
            run.qs,
            prompts,
            qa.max_new_tokens,
            qa.temperature,
            qa.think,
            seed,
            qa.generation_batch,
            progress=what if run.cfg.logging.progress and run.ctx.main else None,
            return_ids=True,
        )


def init_memory(run: Run, questions: list, seed: int) -> dict[str, dict]:
    """One correct rationale per question where hinted, then plain, sampling finds one (its
    text and its sampled token ids, which later steps score)."""
    qa = run.cfg.qa
    shots = shots_for(qa.task)[: qa.shots]
    memory: dict[str, dict] = {}
    for attempt, hinted in enumerate((True, False)):
        todo = [q for q in questions if q.id not in memory]
        if not todo:
            break
        prompts = [format_prompt(q, shots, hint=q.answer if hinted else None) for q in todo]

        got = sample_shared(run, prompts, seed + attempt, "initialise memory", return_ids=True)
        for q, (text, ids) in zip(todo, got, strict=True):
            if answers.reaches_answer(q, text) and "hint" not in text.lower():
                memory[q.id] = {"text": text, "ids": ids}
    return memory


def score(run: Run, prompt_ids: list[list[int]], sampled: list[list[int]]) -> torch.Tensor:
    """``(b,)`` ``log p(sampled | prompt)`` of exactly the sampled token ids, with gradient."""
    ids, mask, cmask = completion_batch_ids(
        pad_of(run.qs.tokenizer), list(zip(prompt_ids, sampled, strict=True)), run.device
    )
    with run.autocast:
        return completion_logprobs(run.model, ids, mask, cmask)


def trice_backward(
    run: Run, prompts: list[list[int]], proposals: list, memories: list, beta, m, batch_size: int
) -> tuple[torch.Tensor, float]:
    """Accumulate the gradient of ``-trice_terms`` for one micro-batch (the memory's and the
    proposal's sampled ids scored under the plain prompt); returns the proposals' log-probs and
    this micro-batch's part of the loss."""
    lp_prop = score(run, prompts, [z["ids"] for z in proposals])
    lp_mem = lp_prop.clone()
    stale = [i for i, (z, r) in enumerate(zip(proposals, memories, strict=True)) if r is not z]
    stale = [i for i in stale if memories[i] is not None]
    if stale:
        got = score(run, [prompts[i] for i in stale], [memories[i]["ids"] for i in stale])
        lp_mem = lp_mem.index_put((torch.tensor(stale, device=run.device),), got)
    terms = selftaught.trice_terms(lp_mem, lp_prop, beta, m, batch_size)
    # data-parallel processes average their gradients: each carries its share of the batch sum
    (-terms * run.ctx.world).backward()
    return lp_prop.detach(), float(-terms.detach())


class TriceRecipe(Recipe):
    """TRICE: a step is one optimiser step over ``train.batch_size`` questions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pool: list = []
        self.eval_q: list = []
        self.memory: dict[str, dict] = {}

    def check(self) -> None:
        qa = self.cfg.qa
        check_sources(qa)
        if qa.temperature != 1.0 or qa.think:
            raise ValueError(
                "TRICE's control variate needs proposals drawn from the model it scores: "
                "qa.temperature must be 1.0 and qa.think false (sampling while thinking draws "
                f"from the mixed distribution, scored without it); got qa.temperature="
                f"{qa.temperature}, qa.think={qa.think}"
            )

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
        self.memory = {k: dict(v) for k, v in state["memory"].items()}

    def coverage(self) -> float:
        return len(self.memory) / max(len(self.pool), 1)

    def train_step(self, run: Run, step: int) -> dict[str, Any]:
        """Propose for the whole batch, update the memory (every process's acceptances), take the
        leave-one-out control variate over the whole batch, then accumulate the gradient micro-
        batch by micro-batch: the step's gradient is ``trice_surrogate``'s over the batch."""
        cfg, ctx = self.cfg, run.ctx
        t0 = time.perf_counter()
        seed = cfg.train.seed * 1_000_003 + step
        batch = random.Random(seed).sample(self.pool, min(cfg.train.batch_size, len(self.pool)))
        micro = cfg.train.micro_batch_size
        shots = shots_for(cfg.qa.task)[: cfg.qa.shots]
        mine = [j * ctx.world + ctx.rank for j in range(run.accum)]  # the same split everywhere
        parts = {k: batch[k * micro : (k + 1) * micro] for k in mine}
        run.qs.eval()
        proposals: dict[str, dict] = {}
        for k, part in parts.items():
            got = _sample(run, [format_prompt(q, shots) for q in part], seed * 31 + k)
            for q, (text, ids) in zip(part, got, strict=True):
                proposals[q.id] = {"text": text, "ids": ids, "correct": answers.is_correct(q, text)}
        correct: dict[str, bool] = {}
        for other in distributed.gather({i: z["correct"] for i, z in proposals.items()}, ctx):
            correct.update(other)
        updates = {i: z for i, z in proposals.items() if z["correct"]}
        for other in distributed.gather(updates, ctx):
            self.memory.update({i: {"text": z["text"], "ids": z["ids"]} for i, z in other.items()})
        c = torch.tensor([correct[q.id] for q in batch], device=run.device)
        m = torch.tensor([q.id in self.memory for q in batch], device=run.device)
        beta = selftaught.trice_control_variate(c, m)
        if not cfg.trice.control_variate:  # the plain estimator (an ablation)
            beta = torch.zeros_like(beta)
        run.qs.train()
        logps, tokens, loss = [], 0, 0.0
        for part in parts.values():
            idx = torch.tensor([batch.index(q) for q in part], device=run.device)
            prompt_ids = [
                run.qs.tokenizer(format_prompt(q, shots), add_special_tokens=False).input_ids
                for q in part
            ]
            props = [proposals[q.id] for q in part]
            mems = [
                props[i] if props[i]["correct"] else self.memory.get(q.id)
                for i, q in enumerate(part)
            ]
            lp, part_loss = trice_backward(
                run, prompt_ids, props, mems, beta[idx], m[idx], len(batch)
            )
            logps.append(lp)
            loss += part_loss
            tokens += sum(len(z["ids"]) for z in props)
        figures = {
            "accept_rate": float(c.float().mean()),
            "contributing": float(m.float().mean()),
            "beta_mean": float(beta[m].mean()) if bool(m.any()) else 0.0,
            "proposal_logp": float(torch.cat(logps).mean()) if logps else 0.0,
        }
        loss = sum(distributed.gather(loss, ctx))  # the batch's surrogate, on every process
        opt = optimizer_step(run, {"loss": loss, **figures}, step)
        run.qs.eval()
        row = {
            "kind": "train",
            "step": step,
            **opt,
            "tokens": distributed.total(tokens, ctx),
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
