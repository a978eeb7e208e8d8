"""The LM head and cross-entropy fused: ``log p(target)`` without materialising ``(N, V)`` logits.

Notation: ``N`` rows (hidden states), ``H`` hidden size, ``V`` vocabulary (or the allowed part of
it), ``T`` temperature, ``c`` final-logit softcap. For each row

    z = softcap(h W^T + b) / T            (V,)    softcap(l) = c tanh(l / c), or l without one
    log p(target) = z[target] - logsumexp(z)

:class:`ChunkedLinearLogprob` computes this over chunks of rows, keeping only the per-row
log-sum-exp; the backward recomputes each chunk's logits (one more head matmul) and forms
``d z = g (onehot - softmax(z))`` in place, so peak memory holds one chunk's ``(rows, V)`` at a
time instead of the logits, a log-softmax copy and the gradient of every row. Everything is
computed in fp32 (the head runs in fp32 for compared logits; see ``QuietStar.lm_logits``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar.core import learn, talk

# rows per chunk: ~8M logits (32 MB in fp32) at a time (measured: 4x larger chunks add ~90 MB to
# the peak RSS of a tiny-model step and are no faster on CPU)
CHUNK_ELEMENTS = 1 << 23


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _logits(h, weight, bias, temperature, softcap):
    """``(rows, H) -> (rows, V)`` logits and, with a softcap, ``tanh(pre / c)`` for backward.

    Without a softcap the temperature divides ``h`` (``H`` values a row) rather than the logits
    (``V`` values a row)."""
    if softcap is None:
        if temperature != 1.0:
            h = h / temperature
            bias = None if bias is None else bias / temperature
        return torch.nn.functional.linear(h, weight, bias), None
    capped = torch.tanh(torch.nn.functional.linear(h, weight, bias) / softcap)
    return capped * (softcap / temperature), capped


class ChunkedLinearLogprob(torch.autograd.Function):
    """``(N, H), (V, H), (V,) or None, (N,) -> (N,)`` log-probabilities of the targets."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        with torch.autocast(hidden.device.type, enabled=False):
            h32, w32 = hidden.to(acc), weight.to(acc)
            b32 = None if bias is None else bias.to(acc)
            out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
            lse = torch.empty_like(out)
            for s in range(0, hidden.shape[0], chunk):
                z, _ = _logits(h32[s : s + chunk], w32, b32, temperature, softcap)
                lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
                out[s : s + chunk] = (
                    z.gather(1, targets[s : s + chunk, None])[:, 0] - lse[s : s + chunk]
                )
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.softcap, ctx.chunk = temperature, softcap, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        T, cap, chunk = ctx.temperature, ctx.softcap, ctx.chunk
        acc = torch.promote_types(hidden.dtype, torch.float32)
        # rows whose gradient is zero (a thought token whose reward the filter zeroed, padding)
        # contribute exactly nothing: recompute and back-propagate the others only
        shape, rows = hidden.shape, (grad_out != 0).nonzero().squeeze(1)
        every = rows.numel() == grad_out.numel()
        if not every:
            hidden, targets, lse = hidden[rows], targets[rows], lse[rows]
            grad_out = grad_out[rows]
        with torch.autocast(hidden.device.type, enabled=False):
            h32, w32 = hidden.to(acc), weight.to(acc)
            b32 = None if bias is None else bias.to(acc)
            g32 = grad_out.to(acc)
            dh = torch.empty_like(h32) if ctx.needs_input_grad[0] else None
            dw = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
            db = torch.zeros_like(b32) if bias is not None and ctx.needs_input_grad[2] else None
            for s in range(0, hidden.shape[0], chunk):
                h = h32[s : s + chunk]
                g = g32[s : s + chunk, None]
                z, capped = _logits(h, w32, b32, T, cap)
                # d logp / d z = g (onehot(target) - softmax(z)), built in place in z
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)
                dz.scatter_add_(1, targets[s : s + chunk, None], g)
                if cap is None:  # z = (h / T) W^T + b / T: scale the (rows, H) side, not (rows, V)
                    dl, scale = dz, 1.0 / T
                else:
                    dl, scale = dz.mul_((1 - capped.square()) / T), 1.0
                if dh is not None:
                    dh[s : s + chunk] = dl @ w32
                    if scale != 1.0:
                        dh[s : s + chunk] *= scale
                if dw is not None:
                    dw.addmm_(dl.t(), h, alpha=scale)
                if db is not None:
                    db.add_(dl.sum(0), alpha=scale)
        if dh is not None and not every:
            dh = dh.new_zeros(shape).index_copy_(0, rows, dh)
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``log p(targets)`` under ``softmax(softcap(hidden W^T + b) / T)``: ``(..., H), (...) -> (...)``."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk or _chunk_rows(weight.shape[0])
    out = ChunkedLinearLogprob.apply(
        h, weight, bias, targets.reshape(-1), float(temperature), softcap, rows
    )
    return out.view(shape)


def reference_logprob(hidden, weight, bias, targets, temperature=1.0, softcap=None):
    """The unfused path (logits materialised): what :func:`linear_logprob` must equal."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = torch.nn.functional.linear(
        hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc)
    )
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]


class VocabularyHead:
    """The LM head seen from the method (mixed into :class:`qstar.QuietStar`): fp32 logits for
    everything that is compared, the meta-free thought vocabulary for sampling and the policy,
    and ``log p(token)`` through either, fused and chunked or not.

    Needs ``base_model``, ``config`` (its ``fused_ce``), ``start_id`` and ``end_id`` on the
    instance.
    """

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H) -> (..., V)`` fp32 logits: the LM head, with final logit softcapping where
        the model has it, always in fp32 (autocast off).

        These are the logits that are compared: base and mixed NLL, the REINFORCE rewards and
        every evaluation. Under bf16 autocast a mixed hidden state ``h_b + w (h_t - h_b)`` with
        ``|w| ~ 1e-4`` would be rounded to bf16 before the head (component spacing ~1e-2), so
        the difference between two thoughts -- the whole reward -- would be mostly rounding
        noise. The sampling and policy logits (:meth:`thought_logits`) keep autocast's dtype.
        """
        head = self.base_model.get_output_embeddings()
        acc = torch.promote_types(head.weight.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        bias = None if head.bias is None else head.bias.to(acc)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = nn.functional.linear(hidden.to(acc), head.weight.to(acc), bias)
        cap = getattr(self.base_model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _fused(self) -> bool:
        """``config.fused_ce``: ``"chunked"`` (the default) computes log p(token) through the
        fused, chunked head (measured on CPU: 40-60% less peak memory and 1.2-1.6x faster steps
        than ``"off"``); ``"off"`` materialises the logits (the reference path)."""
        return self.config.fused_ce != "off"

    def token_logprob(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        temperature: float = 1.0,
        thought: bool = False,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """``log p(target)`` at each row: ``(..., H), (...) -> (...)`` fp32, over the whole
        vocabulary (:meth:`lm_logits`) or, with ``thought``, the meta-free thought vocabulary at
        ``temperature`` (:meth:`thought_logits`; targets are indices in it). Fused and chunked
        unless ``fused_ce="off"`` (or ``fused`` says otherwise): exact either way."""
        if not (self._fused() if fused is None else fused):
            logits = self.thought_logits(hidden, temperature) if thought else self.lm_logits(hidden)
            return learn.logprob_of(logits, targets)
        if thought:
            weight, bias = self._thought_head()
        else:
            head = self.base_model.get_output_embeddings()
            weight, bias = head.weight, head.bias
        cap = getattr(self.base_model.config, "final_logit_softcapping", None)
        return linear_logprob(hidden, weight, bias, targets, temperature, cap)

    def mixed_token_logprob(
        self,
        mixing: str,
        raw_w: torch.Tensor,
        h_base: torch.Tensor,
        h_thought: torch.Tensor,
        targets: torch.Tensor,
        fused: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p_mix(target)`` of either mixing variant (:mod:`qstar.core.talk`) without keeping
        ``(..., V)`` logits: ``(..., 1), (..., H), (..., H), (...) -> ((...), w (..., 1))``.

        ``hidden`` mixes the hidden states and goes through :meth:`token_logprob`. ``logprob``
        renormalises ``(1 - w) log p_base + w log p_thought``; the two log-sum-exps are constant
        along the vocabulary, so this is ``log_softmax((1 - w) z_base + w z_thought)`` and, for a
        head without softcapping (linear), the head applied to ``h_base + w (h_thought - h_base)``:
        the same fused path, at the cost of the hidden mixture. With softcapping the logits are
        not linear in ``h``; rows are then processed in chunks under activation checkpointing
        (one chunk's two ``(rows, V)`` logits at a time, recomputed in backward: two more head
        matmuls per row than the unfused path).
        """
        if mixing == "hidden":
            h_mix, w = talk.mix_hidden_state(raw_w, h_base, h_thought)
            return self.token_logprob(h_mix, targets, fused=fused), w
        w = torch.sigmoid(raw_w.to(torch.promote_types(h_base.dtype, torch.float32)))
        cap = getattr(self.base_model.config, "final_logit_softcapping", None)
        if cap is None:
            h_mix, _ = talk.mix_hidden_state(w, h_base, h_thought)
            return self.token_logprob(h_mix, targets, fused=fused), w

        def rows_logprob(w_, hb, ht, tgt):
            lp, _ = talk.mix_logprob(w_, hb, ht, self.lm_logits, weight_is_raw=False)
            return learn.logprob_of(lp, tgt)

        shape = targets.shape
        flat = [x.reshape(-1, x.shape[-1]) for x in (w.expand(*shape, 1), h_base, h_thought)] + [
            targets.reshape(-1)
        ]
        rows = max(1, _chunk_rows(self.base_model.get_output_embeddings().weight.shape[0]) // 2)
        out = [
            checkpoint(rows_logprob, *(x[s : s + rows] for x in flat), use_reentrant=False)
            for s in range(0, flat[-1].shape[0], rows)
        ]
        return torch.cat(out).view(shape), w

    def thought_logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``(..., H) -> (..., V - 2)``: logits over the vocabulary *without* the meta tokens.

        Thought tokens are drawn from this vocabulary (the authors mask ``<start>``/``<end>``);
        computing it with the head's other rows avoids masking full ``(..., V)`` tensors. Map
        indices with :meth:`to_vocab` / :meth:`from_vocab`. For a bias-free head without
        softcapping the temperature divides the hidden state (H values) instead of the logits.
        """
        weight, bias = self._thought_head()
        cap = getattr(self.base_model.config, "final_logit_softcapping", None)
        if bias is None and cap is None:
            return nn.functional.linear(
                hidden / temperature if temperature != 1.0 else hidden, weight
            )
        logits = nn.functional.linear(hidden, weight, bias)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits / temperature if temperature != 1.0 else logits

    def _thought_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight and bias without the meta rows (a view when they are last)."""
        head = self.base_model.get_output_embeddings()
        rows = head.weight.shape[0]
        if (self.start_id, self.end_id) == (rows - 2, rows - 1):
            return head.weight[:-2], None if head.bias is None else head.bias[:-2]
        cached = getattr(self, "_head_cache", None)
        key = (head.weight.data_ptr(), head.weight._version)
        grad = torch.is_grad_enabled()
        if (
            not grad and cached is not None and cached[0] == key
        ):  # sampling: one copy, not one per depth
            return cached[1]
        keep = torch.ones(rows, dtype=torch.bool)
        keep[[self.start_id, self.end_id]] = False
        keep = keep.nonzero().squeeze(1).to(head.weight.device)
        value = (
            head.weight.index_select(0, keep),
            None if head.bias is None else head.bias.index_select(0, keep),
        )
        if not grad:
            self._head_cache = (key, value)
        return value

    def reset_head_cache(self) -> None:
        """Forget the meta-free head copy kept while sampling (call before each sampling: the
        weights may have changed or moved)."""
        self._head_cache = None

    def to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Index in the meta-free vocabulary -> token id."""
        lo, hi = sorted((self.start_id, self.end_id))
        idx = idx + (idx >= lo).long()
        return idx + (idx >= hi).long()

    def from_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """Token id (not a meta token) -> index in the meta-free vocabulary."""
        return ids - (ids > self.start_id).long() - (ids > self.end_id).long()
