"""Scoring completions under a model: the log-probability of a rationale and answer after its
prompt, through the model's fused head (what STaR fine-tunes on, TRICE's estimator and V-STaR's
verifier score). Prompt tokens are context only. ``model``: a :class:`qstar.QuietStar` or a
data-parallel wrapper around one."""

from __future__ import annotations

import torch


def completion_batch(
    tok, rows: list[dict], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention mask, completion mask)`` of ``prompt`` + ``target`` rows
    (text; the target ends with EOS where the tokenizer has one): supervised targets."""
    pairs = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False).input_ids
        t = tok(r["target"], add_special_tokens=False).input_ids
        if tok.eos_token_id is not None:
            t = t + [tok.eos_token_id]
        pairs.append((p, t))
    return completion_batch_ids(pad_of(tok), pairs, device)


def pad_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def completion_batch_ids(
    pad: int, pairs: list[tuple[list[int], list[int]]], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same from token ids: ``(prompt ids, completion ids)`` pairs, the completion exactly
    as given (a sample's own tokens, :func:`qstar.qa.sampling.sample_rationales` with
    ``return_ids``), nothing re-tokenised or appended."""
    seqs = [p + t for p, t in pairs]
    comp = [[0] * len(p) + [1] * len(t) for p, t in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    cmask = torch.tensor([c + [0] * (width - len(c)) for c in comp], device=device).bool()
    return ids, mask, cmask


def _completion_token_logprobs(model, ids, mask) -> torch.Tensor:
    """``(B, L - 1)`` ``log p(x_{i+1})`` under the plain model (no thoughts): the training
    forward without thinking, so a data-parallel wrapper around the model sees the call."""
    return model(ids, attention_mask=mask, think=False).base_logprob


def completion_logprobs(model, ids, mask, cmask) -> torch.Tensor:
    """``(B,)`` summed log-probability of each row's completion tokens
    (:func:`qstar.core.selftaught.completion_logprob` on materialised logits is the reference)."""
    return (_completion_token_logprobs(model, ids, mask) * cmask[:, 1:]).sum(-1)


def completion_loss(model, ids, mask, cmask) -> torch.Tensor:
    """Mean next-token NLL of the completion tokens."""
    lp = _completion_token_logprobs(model, ids, mask)
    m = cmask[:, 1:].to(lp.dtype)
    return -(lp * m).sum() / m.sum().clamp(min=1)


def score_texts(qs, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """``(B,)`` log-probability of each target after its prompt."""
    device = next(qs.parameters()).device
    rows = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    return completion_logprobs(qs, *completion_batch(qs.tokenizer, rows, device))
