"""Sampling rationales and scoring held-out accuracy, the same for every method: batched,
KV-cached, left-padded generation through the model's own ``generate`` (a Quiet-STaR model
thinks while it writes when asked), with the few-shot prefix every prompt of a batch shares run
once. The model is any :class:`qstar.QuietStar` (used through its public methods)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from qstar.qa import answers
from qstar.qa.answers import QAExample
from qstar.qa.arith import accuracy_by_digits
from qstar.qa.prompts import format_prompt, shots_for

STOP_STRINGS = ("\nQ:", "\n\n")


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


def sampled_prefix(tok, row: list[int], eos: int | None) -> list[int]:
    """The tokens of a generated row that belong to the sample: up to and including EOS or the
    token that completes a stop string (generation of a batch runs on until every row has
    stopped; what follows is not part of the sample). Binary search over prefixes: once a stop
    string appears in the decoded prefix it stays."""
    if eos is not None and eos in row:
        row = row[: row.index(eos) + 1]

    def stopped(n: int) -> bool:
        text = tok.decode(row[:n], skip_special_tokens=True)
        return any(s in text for s in STOP_STRINGS)

    if not stopped(len(row)):
        return row
    lo, hi = 1, len(row)  # the shortest prefix that has stopped
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
    return row[:lo]


def sample_rationales(
    qs,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    think: bool,
    seed: int,
    batch: int,
    stop_early: bool = True,
    progress: str | None = None,
    share_prefix: bool = True,
    return_ids: bool = False,
) -> list[str] | list[tuple[str, list[int]]]:
    """One completion per prompt: batched, KV-cached, left-padded generation
    (:func:`qstar.core.generation.generate`), greedy at ``temperature`` 0; each completion cut at
    :data:`STOP_STRINGS`. Generation of a batch ends once every row has stopped (with
    ``stop_early``; without, after ``max_new_tokens``, as the benchmark compares). The tokens
    every prompt of a batch starts with (the worked examples) are run once and their cache
    shared (``share_prefix``). ``progress``: the description of a progress bar counting
    rationales (with their rate per second). ``return_ids``: each completion with the token ids
    the model sampled for it, up to and including the token that ended it (EOS, or the one that
    completed a stop string): exactly what a score of the sample must score."""
    tok = qs.tokenizer
    bar = None
    if progress is not None:
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
            sampled = sampled_prefix(tok, row, eos)
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            text = stop_text(tok.decode(row, skip_special_tokens=True))
            out.append((text, sampled) if return_ids else text)
        if bar is not None:
            bar.update(len(encoded))
    if bar is not None:
        bar.close()
    return out


@torch.no_grad()
def qa_accuracy(qs, qa, questions: list[QAExample], progress: bool = False) -> dict[str, float]:
    """Greedy answers to held-out ``questions`` with the ``qa`` section's prompt (its worked
    examples), checked (:func:`qstar.qa.answers.is_correct`): ``eval/qa_acc`` and
    ``eval/qa_n``, for arithmetic also ``eval/qa_acc_d{n}`` and ``eval/qa_n_d{n}`` for each digit
    count ``n`` (:func:`qstar.qa.arith.accuracy_by_digits`); ``{}`` without questions."""
    if not questions:
        return {}
    shots = shots_for(qa.task)[: qa.shots]
    was_training = qs.training
    qs.eval()
    try:
        texts = sample_rationales(
            qs,
            [format_prompt(q, shots) for q in questions],
            qa.max_new_tokens,
            0.0,
            qa.think,
            0,
            qa.generation_batch,
            progress="evaluate" if progress else None,
        )
    finally:
        qs.train(was_training)
    correct = [answers.is_correct(q, t) for q, t in zip(questions, texts, strict=True)]
    out = {"eval/qa_acc": sum(correct) / len(correct), "eval/qa_n": float(len(correct))}
    if qa.task == "arith":
        out.update(accuracy_by_digits(questions, correct))
    return out
