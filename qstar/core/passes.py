"""The passes over the wrapped model's transformer that thinking is made of (mixed into
:class:`qstar.QuietStar`): the plain pass with the trained meta tokens, the base pass that keeps
its KV cache, a pass of thought blocks in the thought attention layout, and depth-by-depth
sampling of thoughts. The training forward (:mod:`qstar.core.model`) and inference
(:mod:`qstar.core.inference`) are built from these.

Notation: ``B`` rows, ``L`` positions, ``nq`` depth blocks fed at once, ``t`` thought tokens,
``H`` hidden size.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qstar.core import hf
from qstar.core import think as think_mod
from qstar.core.attention import dense_mask_for, thought_attention


class ThoughtPasses:
    """Needs ``base_model``, ``config``, ``meta_embeddings``, ``thinker``, ``start_id`` and
    the vocabulary-head methods (:class:`qstar.core.head.VocabularyHead`) on the instance."""

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (``LlamaModel``, ``GPT2Model``...), also under a
        PEFT wrapper (:func:`qstar.core.hf.backbone`)."""
        return hf.backbone(self.base_model)

    def thinking(self, rows: torch.Tensor | None = None):
        """The context of a pass that feeds thought rows: the ``thinker`` adapter is active
        there (on every token, or where ``rows`` ``(B, n)`` is true); nothing without one."""
        return self.thinker.active(rows) if self.thinker is not None else contextlib.nullcontext()

    def backbone_pass(self, input_ids: torch.Tensor, **kwargs):
        """The transformer over ``input_ids`` embedded with the trained meta tokens: its output
        (``last_hidden_state``, ``cache``); ``kwargs`` go to the backbone (``attention_mask``,
        ``position_ids``, ``cache``, ``use_cache``)."""
        return self.backbone(inputs_embeds=self.embed(input_ids), **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, L, H)``: the model's input embeddings with the trained meta tokens."""
        emb_layer = self.base_model.get_input_embeddings()
        emb = emb_layer(input_ids)
        scale = hf.embedding_scale(emb_layer)  # Gemma scales inside its embedding
        meta = self.meta_embeddings * self.config.meta_scale * scale  # (2, H)
        meta = meta.to(emb.dtype)
        emb = torch.where((input_ids == self.start_id).unsqueeze(-1), meta[0], emb)
        return torch.where((input_ids == self.end_id).unsqueeze(-1), meta[1], emb)

    def check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, think: bool = True
    ) -> torch.Tensor:
        """Shape checks (right padding only; room for the thought block when thinking); the
        ``(B, L)`` bool mask."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}"
            )
        limit = getattr(self.base_model.config, "max_position_embeddings", None)
        needed = input_ids.shape[1] + (self.config.thought_block if think else 0)
        if think and limit is not None and needed > limit:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} + thought block {self.config.thought_block} "
                f"exceeds the model's {limit} positions; use shorter windows"
            )
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        valid = attention_mask.bool()
        # Right padding only: each row is ones then zeros.
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError(
                "attention_mask must be right-padded (ones then zeros); pad on the right"
            )
        return valid

    def base_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """``(B, L) -> h (B, L, H)``, KV cache of the ``L`` tokens."""
        out = self.backbone_pass(
            input_ids, attention_mask=attention_mask, cache=hf.new_cache(), use_cache=True
        )
        return out.last_hidden_state, out.cache

    def thought_pass(
        self,
        tokens: torch.Tensor,
        cache: hf.Cache,
        n_prefix: int,
        first_block: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed ``nq`` depth blocks at once.

        Args:
            tokens: ``(B, nq, L)`` tokens of blocks ``first_block .. first_block + nq - 1``
                (``(B, nq, m)`` with ``positions``).
            cache: holds the prefix and the ``first_block`` earlier blocks; extended in place.
            positions: ``(B / k, m)``: thoughts at these positions only (``quiet_star.think_at``;
                rows repeated like the batch), else at every position.
        Returns:
            ``(B, nq, L, H)`` hidden states.
        """
        B, nq, L = tokens.shape
        if positions is not None:
            return self._positions_pass(tokens, cache, n_prefix, first_block, positions)
        if self.config.attention == "dense" and nq > 1:
            # The authors' way: one depth per call, each with its dense (L, (d+1)L) mask slice.
            return torch.cat(
                [
                    self.thought_pass(tokens[:, d : d + 1], cache, n_prefix, first_block + d)
                    for d in range(nq)
                ],
                dim=1,
            )
        depth = torch.arange(first_block, first_block + nq, device=tokens.device)
        position_ids = torch.arange(L, device=tokens.device)[None, :] + depth[:, None] + 1
        position_ids = position_ids.reshape(1, nq * L).expand(B, -1)  # (B, nq*L): i + d
        kwargs = {}
        if self.config.attention == "dense":
            kwargs["attention_mask"] = dense_mask_for(
                self.base_model.config,
                L,
                first_block + nq,
                nq,
                self.meta_embeddings.dtype,
                tokens.device,
            )
        with thought_attention(self.base_model, n_prefix, self.config.attention), self.thinking():
            out = self.backbone_pass(
                tokens.reshape(B, nq * L),
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                **kwargs,
            )
        return out.last_hidden_state.view(B, nq, L, -1)

    def _positions_pass(self, tokens, cache, n_prefix, first_block, positions):
        """:meth:`thought_pass` for thoughts at chosen positions: ``(B, nq, m) -> (B, nq, m, H)``."""
        B, nq, m = tokens.shape
        pos = positions.repeat_interleave(B // positions.shape[0], dim=0)  # (B, m)
        depth = torch.arange(first_block, first_block + nq, device=tokens.device)
        position_ids = (pos[:, None, :] + depth[None, :, None] + 1).reshape(B, nq * m)
        with thought_attention(self.base_model, n_prefix, "einsum", pos), self.thinking():
            out = self.backbone_pass(
                tokens.reshape(B, nq * m), position_ids=position_ids, cache=cache, use_cache=True
            )
        return out.last_hidden_state.view(B, nq, m, -1)

    @torch.no_grad()
    def sample_from_cache(
        self,
        cache: hf.Cache,
        n_prefix: int,
        batch: int,
        greedy: bool,
        generator: torch.Generator | None,
        uniforms: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample ``t`` thought tokens at every position (:func:`qstar.core.think.sample`), or
        at ``positions`` only; extends ``cache`` by ``t`` blocks. Returns token ids ``(batch,
        L, t)`` (``(batch, m, t)``)."""
        L = n_prefix if positions is None else positions.shape[1]
        t = self.config.thought_len
        device = self.meta_embeddings.device
        self.reset_head_cache()  # one meta-free head per sampling (sharded weights move)
        if not greedy and uniforms is None:
            uniforms = think_mod.draw_uniforms((batch, t, L), generator, device)

        def step(idx: torch.Tensor, depth: int) -> torch.Tensor:  # (B, L) -> (B, L, H)
            tok = idx if depth == 0 else self.to_vocab(idx)
            return self.thought_pass(tok[:, None], cache, n_prefix, depth, positions)[:, 0]

        start = torch.full((batch, L), self.start_id, dtype=torch.long, device=device)
        idx = think_mod.sample(
            step, self.thought_logits, start, t, uniforms, self.config.thought_temperature
        )
        return self.to_vocab(idx)

    # ------------------------------------------------------------------ public API
