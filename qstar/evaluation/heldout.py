"""Evaluation during training: held-out next-token NLL with and without thinking, and lm-eval
tasks on the live model (what the training recipes call at every evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qstar.core.model import QuietStar
from qstar.data import collate
from qstar.evaluation.results import metric_table
from qstar.run_config import RunConfig


@torch.no_grad()
def heldout_nll(
    qs: QuietStar,
    windows: list[list[int]],
    batch_size: int,
    device,
    think: bool = True,
    per_token: dict[str, list[list[float]]] | None = None,
) -> dict[str, float]:
    """Next-token NLL on fixed windows without thoughts and, if ``think``, after greedy thoughts.

    ``per_token``: a dict that receives ``{"base": [[nll of each target] per window],
    "thought": [...]}`` (what reports bootstrap over and split by token difficulty)."""
    was_training = qs.training
    qs.eval()
    pad = qs.fill_id
    sums = {"base": 0.0, "thought": 0.0}
    tokens: dict[str, list[list[float]]] = {"base": [], "thought": []}
    count = 0
    try:
        for i in range(0, len(windows), batch_size):
            ids, mask = collate(windows[i : i + batch_size], pad)
            ids, mask = ids.to(device), mask.to(device)
            valid = (mask[:, 1:] & mask[:, :-1]).bool()
            count += int(valid.sum())
            # log p(x_{i+1}) through the fused head: no (b, L, V) logits
            scored = {"base": qs.next_token_logprobs(ids, mask, think=False)}
            if think:
                scored["thought"] = qs.next_token_logprobs(ids, mask)
            for name, lp in scored.items():
                nll = -lp  # (b, L-1)
                sums[name] += float(nll[valid].sum())
                tokens[name] += [
                    row[v].tolist() for row, v in zip(nll.cpu(), valid.cpu(), strict=True)
                ]
    finally:
        qs.train(was_training)
    out = {"eval/nll_base": sums["base"] / max(count, 1)}
    if think:
        out["eval/nll_thought"] = sums["thought"] / max(count, 1)
        out["eval/nll_delta"] = out["eval/nll_thought"] - out["eval/nll_base"]
    if per_token is not None:
        per_token.update({k: v for k, v in tokens.items() if v})
    return out


def task_metrics(
    qs: QuietStar,
    cfg: RunConfig,
    think: bool,
    samples_dir: Path | None = None,
    plain: bool = False,
) -> dict[str, float]:
    """lm-eval ``eval.tasks`` on the live model: ``{"eval/TASK/METRIC": value}``.

    Without thinking (``think=False``) the keys are ``eval/TASK:nothink/...``, unless the model
    never thinks in this run (``plain``: the LM baseline, the STaR family without ``qa.think``),
    whose scores keep the plain names.
    ``samples_dir``: where to write each task's per-example metrics (``TASK[:nothink].jsonl``,
    one ``{"doc_id", METRIC: value}`` row per example), for paired confidence intervals."""
    from qstar.evaluation import backend as evaluation  # lm-eval: heavy, only when tasks run

    was_training = qs.training
    qs.eval()
    try:
        lm = evaluation.QStarLM(model=qs, think=think, batch_size=cfg.eval.batch_size)
        results = evaluation.evaluate(
            lm,
            cfg.eval.tasks,
            cfg.eval.limit,
            cfg.eval.include_paths,
            data_dir=cfg.data.data_dir,
            seed=cfg.train.seed,
            log_samples=samples_dir is not None,
        )
    finally:
        qs.train(was_training)
    # ":nothink" marks a Quiet-STaR model scored without its thoughts
    suffix = "" if think or plain else ":nothink"
    table = metric_table(results)
    if samples_dir is not None:
        samples_dir.mkdir(parents=True, exist_ok=True)
        for task, rows in (results.get("samples") or {}).items():
            keep = set(table.get(task, {}))
            lines = [
                json.dumps({"doc_id": r.get("doc_id"), **{k: r[k] for k in sorted(keep) if k in r}})
                for r in rows
            ]
            (samples_dir / f"{task}{suffix}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        f"eval/{task}{suffix}/{metric}": value
        for task, metrics in table.items()
        for metric, value in metrics.items()
    }
