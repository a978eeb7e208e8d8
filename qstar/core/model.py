"""``QuietStar``: wraps any Hugging Face causal LM by composition (think -> talk -> learn).

Notation: ``B`` sequences, ``k`` thoughts per position, ``L`` positions, ``t`` thought tokens,
``n`` = ``n_true``, ``D = t + 1 + n`` tokens fed per position after the base pass
(``<start>, c_1..c_t, <end>, x_{i+1}..x_{i+n-1}``), ``H`` hidden size, ``V`` vocabulary.

One training step (see ``forward``):
  1. base pass over ``x`` once (with gradient), keeping its KV cache;
  2. thoughts sampled depth by depth *without gradient* from a ``k``-times repeated cache;
  3. one teacher-forced forward of all ``D`` depths at once (with gradient) on the repeated
     cache, with the thought attention layout of :mod:`qstar.core.attention`;
  4. mixed predictions of the true tokens after each thought (:mod:`qstar.core.talk`) and the
     thought tokens' log-probabilities: a :class:`qstar.core.learn.StepOutput`, which an
     objective (:data:`qstar.core.learn.OBJECTIVES`) turns into a loss.
Step 3 recomputes what step 2 computed, which is what lets step 2 keep no activations.

Inference (:mod:`qstar.core.inference`) uses the public passes of this class: ``check_inputs``,
``backbone_pass``, ``base_pass``, ``thought_pass``, ``sample_from_cache`` and ``mix_logits``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from qstar.config import QuietStarConfig
from qstar.core import generation, hf, inference, persistence
from qstar.core import think as think_mod
from qstar.core.head import VocabularyHead
from qstar.core.learn import StepOutput, logprob_of
from qstar.core.passes import ThoughtPasses
from qstar.core.positions import GateHead, choose, gather_columns
from qstar.core.talk import MixingHead, get_mixer
from qstar.core.thinker import ThinkerAdapter, detached_parameters


class QuietStar(VocabularyHead, ThoughtPasses, nn.Module):
    """A Hugging Face causal LM that thinks before each token.

    Build with :meth:`from_base` (a loaded model and tokenizer) or :meth:`from_pretrained`
    (a hub id, a local directory, a GGUF file, or a directory written by :meth:`save_pretrained`).
    """

    def __init__(self, base_model: nn.Module, tokenizer, config: QuietStarConfig):
        """Attach to a model whose tokenizer already has the meta tokens (use ``from_base``)."""
        super().__init__()
        config.validate()
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.config = config
        self.start_id = persistence.token_id(tokenizer, config.start_token)
        self.end_id = persistence.token_id(tokenizer, config.end_token)
        emb = base_model.get_input_embeddings()
        hidden = emb.weight.shape[1]
        ref = emb.weight
        # Stored divided by meta_scale and multiplied back on use: under Adam this multiplies the
        # meta tokens' effective learning rate by meta_scale (the authors' `embedding_scale`).
        self.meta_embeddings = nn.Parameter(
            torch.zeros(2, hidden, dtype=ref.dtype, device=ref.device)
        )
        self.mixing_head = MixingHead(hidden).to(device=ref.device, dtype=ref.dtype)
        self.gate_head = GateHead(hidden).to(device=ref.device) if config.gate else None
        self.thinker = (
            ThinkerAdapter(
                base_model, config.thinker_rank, config.thinker_alpha, config.thinker_targets
            )
            if config.thinker == "lora"
            else None
        )
        self.fill_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def mix_logits(
        self, raw_w: torch.Tensor, h_base: torch.Tensor, h_thought: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., 1), (..., H), (..., H) -> (logits (..., V), w (..., 1))``: the prediction after
        a thought, mixed with the base prediction by ``config.mixing``
        (:data:`qstar.core.talk.MIXERS`); with ``logprob`` mixing the values are normalised
        log-probabilities."""
        return get_mixer(self.config.mixing)(raw_w, h_base, h_thought, self.lm_logits)

    # the meta tokens and their scale are part of the weights: they cannot change for a block
    FIXED_FIELDS = (
        "start_token",
        "end_token",
        "meta_init_text",
        "meta_scale",
        "thinker",
        "thinker_rank",
        "thinker_alpha",
        "thinker_targets",
        "gate",
    )

    @contextlib.contextmanager
    def using(self, **changes):
        """Run a block with ``config.replace(**changes)`` (validated), restored on exit: e.g.
        ``with qs.using(thought_len=8, attention="dense"): ...``. Nothing else sees the change
        once the block ends, so a shared model is never left modified."""
        fixed = sorted(set(changes) & set(self.FIXED_FIELDS))
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)} belong to the trained weights; they cannot change"
            )
        previous = self.config
        self.config = previous.replace(**changes)
        try:
            yield self
        finally:
            self.config = previous

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls, model: nn.Module, tokenizer, config: QuietStarConfig | None = None
    ) -> QuietStar:
        """Add the meta tokens to ``tokenizer`` and ``model``, initialised from ``---``
        (:func:`qstar.core.persistence.from_base`)."""
        return persistence.from_base(cls, model, tokenizer, config)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, config: QuietStarConfig | None = None, **load_kwargs
    ) -> QuietStar:
        """Load a saved QuietStar directory, or wrap a base model (hub id, directory, GGUF file).

        ``config`` overrides the saved configuration (the meta tokens and mixing head are still
        restored). ``load_kwargs`` go to :func:`qstar.models.loading.load_model` (``dtype``,
        ``device``...)."""
        return persistence.from_pretrained(cls, path_or_id, config, **load_kwargs)

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the HF model and tokenizer, ``qstar_config.json`` and ``qstar_heads.safetensors``.

        ``state_dict``: this module's weights as whole tensors, to write in place of its own
        parameters (a sharded model gathers them first, see :mod:`qstar.runs.distributed`)."""
        return persistence.save_pretrained(self, directory, state_dict)

    # ------------------------------------------------------------------ model pieces
    def sample_thoughts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One thought per position: ``(B, L) -> (B, L, t)`` (no ``<start>``/``<end>``).

        The thought at position ``i`` is what autoregressive decoding of ``x_0..x_i, <start>``
        would produce (greedy, or the same uniform draws; see :mod:`qstar.core.think`).
        """
        self.check_inputs(input_ids, attention_mask)
        with torch.no_grad():
            _, cache = self.base_pass(input_ids, attention_mask)
            return self.sample_from_cache(
                cache, input_ids.shape[1], input_ids.shape[0], greedy, generator
            )

    def mixed_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        greedy: bool = True,
        generator: torch.Generator | None = None,
        return_thoughts: bool = False,
        fixed_thought: int | None = None,
    ):
        """Next-token logits after thinking at every position: ``(B, L) -> (B, L, V)``.

        Row ``i`` predicts ``x_{i+1}`` from the mix of the base prediction and the prediction
        at ``<end>`` of the thought at ``i`` (what evaluation scores). With ``mixing="logprob"``
        the returned values are normalised log-probabilities. ``fixed_thought``: a token id that
        replaces every thought token (a control: the same mixing head and passes, no content).
        """
        return inference.mixed_logits(
            self, input_ids, attention_mask, greedy, generator, return_thoughts, fixed_thought
        )

    def mixed_logits_at(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        greedy: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mixed logits at chosen positions only: ``(B, L), (B, m) -> (B, m, V)``
        (:func:`qstar.core.inference.mixed_logits_at`)."""
        return inference.mixed_logits_at(
            self, input_ids, positions, attention_mask, greedy, generator
        )

    def next_token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        think: bool = True,
        fixed_thought: int | None = None,
    ) -> torch.Tensor:
        """``log p(x_{i+1})`` after greedy thoughts or from the base model, ``(B, L) ->
        (B, L - 1)``, without ``(B, L, V)`` logits
        (:func:`qstar.core.inference.next_token_logprobs`)."""
        return inference.next_token_logprobs(self, input_ids, attention_mask, think, fixed_thought)

    @torch.no_grad()
    def base_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L) -> (B, L, V)``: the base model's logits (no thinking), through the same embedding."""
        out = self.backbone_pass(input_ids, attention_mask=attention_mask)
        return self.lm_logits(out.last_hidden_state)

    def generate(
        self, input_ids: torch.Tensor, attention_mask=None, return_thoughts: bool = False, **kwargs
    ):
        """KV-cached batch generation that thinks before every emitted token: ``(B, P) -> (B, n)``
        new tokens (:func:`qstar.core.generation.generate`; its keyword arguments, ``on_token``
        to stream). ``return_thoughts``: also ``(B, n, t)`` the thought before each token
        (``-1`` where none) and ``(B, n)`` its mixing weight."""
        if not return_thoughts:
            return generation.generate(self, input_ids, attention_mask, **kwargs)
        steps: list[dict] = []
        user = kwargs.pop("on_token", None)

        def keep(info: dict) -> None:
            steps.append(info)
            if user is not None:
                user(info)

        tokens = generation.generate(self, input_ids, attention_mask, on_token=keep, **kwargs)
        B, t = tokens.shape[0], self.config.thought_len
        none = torch.full((B, t), -1, dtype=torch.long, device=tokens.device)
        thoughts = torch.stack(
            [s["thoughts"] if s["thoughts"] is not None else none for s in steps], dim=1
        )
        zero = torch.zeros(B, device=tokens.device)
        weights = torch.stack(
            [s["weights"].float() if s["weights"] is not None else zero for s in steps], dim=1
        )
        return tokens, thoughts, weights

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        think: bool = True,
        policy_temperature: float = 1.0,
        trunk_grad: str = "all",
        think_at: str = "all",
        think_fraction: float = 1.0,
    ) -> StepOutput:
        """One training forward (see the module docstring): what a step computed, no loss.

        ``think=False`` is the base pass alone (the no-thought baseline), through the same module
        so that data-parallel wrappers see it. ``policy_temperature``: the temperature of the
        thought tokens' log-probabilities (the objective's; the authors score at 3).
        ``trunk_grad="lm_only"``: everything computed from a thought reads the base model's
        weights, the base pass's states and its cache as constants, so the thinking terms'
        gradient reaches only what thinking adds (meta tokens, mixing head, a thinker adapter).
        ``think_at`` / ``think_fraction``: think at every position (``all``) or at that fraction
        of each window's positions, chosen by :func:`qstar.core.positions.choose` (``hardest``
        by the no-thought loss of this step's base pass, ``random``, ``gate`` by the gate head);
        only the chosen positions are sampled, recomputed and scored."""
        valid = self.check_inputs(input_ids, attention_mask, think)
        if not think:
            h = self.backbone_pass(input_ids, attention_mask=attention_mask).last_hidden_state
            return StepOutput(self.token_logprob(h[:, :-1], input_ids[:, 1:]), valid)
        cfg = self.config
        if cfg.attention == "flex" and torch.is_grad_enabled() and not input_ids.is_cuda:
            raise ValueError(
                "quiet_star.attention=flex has no backward on CPU (a FlexAttention limit); "
                "use attention=sparse, which picks FlexAttention on CUDA by itself"
            )
        # base pass, once per sequence: (B, L, H) and its KV cache
        h_base, cache = self.base_pass(input_ids, attention_mask)
        base_lp = self.token_logprob(h_base[:, :-1], input_ids[:, 1:])  # (B, L-1)
        gate = self.gate_head(h_base.detach()) if self.gate_head is not None else None
        positions = None
        if think_at != "all" and think_fraction < 1.0:
            if think_at == "gate" and gate is None:
                raise ValueError(
                    "quiet_star.think_at=gate needs a model with a gate (quiet_star.gate=true)"
                )
            positions = choose(think_at, think_fraction, valid, -base_lp, gate, generator)
        lm_only = trunk_grad == "lm_only"
        with detached_parameters(self.base_model) if lm_only else contextlib.nullcontext():
            out = self._thinking_terms(
                input_ids,
                valid,
                h_base.detach() if lm_only else h_base,
                cache,
                greedy,
                generator,
                policy_temperature,
                lm_only,
                positions,
            )
        out.base_logprob, out.gate_score = base_lp, gate
        return out

    def _thinking_terms(
        self,
        input_ids,
        valid,
        h_base,
        cache,
        greedy,
        generator,
        policy_temperature,
        detach_cache,
        positions,
    ) -> StepOutput:
        """Everything a step computes from thoughts (:meth:`forward`), at every position or at
        ``positions`` (``(B, m)``); ``C`` below is ``L`` or ``m``."""
        cfg = self.config
        B, L = input_ids.shape
        k, t, n = cfg.n_thoughts, cfg.thought_len, cfg.n_true

        def cols(x, dim):  # the position axis cut to the chosen positions
            return x if positions is None else gather_columns(x, positions, dim)

        # think: (Bk, C, t) thoughts, then (Bk, D, C, H) hidden states of every depth
        thoughts, h = self._think(input_ids, cache, k, greedy, generator, detach_cache, positions)
        C = thoughts.shape[1]
        # talk: mix base and post-thought predictions of x_{i+1..i+n}, (Bk, n, C, 1) weights
        h_b = cols(h_base[:, think_mod.lookahead_index(L, n, h.device)], 2)
        h_b = h_b.repeat_interleave(k, dim=0)
        targets = cols(think_mod.shifted_targets(input_ids, n, self.fill_id).transpose(1, 2), 2)
        targets = targets.repeat_interleave(k, dim=0)  # (Bk, n, C)
        raw_w = self.mixing_head(h_b, h[:, t + 1 :])
        if self._fused():  # no (Bk, n, C, V) logits kept
            logprob, w = self.mixed_token_logprob(cfg.mixing, raw_w, h_b, h[:, t + 1 :], targets)
        else:  # the reference path: logits materialised
            logits, w = self.mix_logits(raw_w, h_b, h[:, t + 1 :])  # (Bk, n, C, V)
            logprob = logprob_of(logits, targets)
            del logits
        # policy log-probs of c_1..c_t, predicted at depths 0..t-1, at the policy temperature
        thought_lp = self.token_logprob(
            h[:, :t],
            self.from_vocab(thoughts.transpose(1, 2)),
            policy_temperature,
            thought=True,
        )  # (Bk, t, C)
        return StepOutput(
            base_logprob=None,
            valid=valid,
            lookahead_logprob=logprob.view(B, k, n, C).transpose(2, 3),  # (B, k, C, n)
            thought_logprob=thought_lp.view(B, k, t, C).transpose(2, 3),  # (B, k, C, t)
            mixing_weight=w.detach().view(B, k, n, C).transpose(2, 3),  # (B, k, C, n)
            thoughts=thoughts.view(B, k, C, t),
            target_valid=cols(think_mod.shifted_valid(valid, n), 1)[:, None],  # (B, 1, C, n)
            positions=positions,
        )

    def _think(self, input_ids, cache, k, greedy, generator, detach_cache=False, positions=None):
        """Sample ``k`` thoughts per position without gradient (no activations kept), then
        recompute every depth at once with gradient: ``(Bk, C, t)`` thoughts and hidden states
        ``(Bk, D, C, H)``, depth 0 = ``<start>`` ... ``t`` = ``c_t``, ``t+1`` = ``<end>``,
        ``t+1+j`` = ``x_{i+j}`` (``C``: every position, or the chosen ones)."""
        B, L = input_ids.shape
        thoughts = self.sample_from_cache(
            hf.repeat_cache(cache, k, detach=True), L, B * k, greedy, generator, None, positions
        )
        ids = input_ids.repeat_interleave(k, dim=0)
        if positions is None:
            block = think_mod.thought_block_tokens(
                ids, thoughts, self.start_id, self.end_id, self.config.n_true, self.fill_id
            )
        else:
            block = think_mod.thought_block_at(
                ids,
                thoughts,
                positions,
                self.start_id,
                self.end_id,
                self.config.n_true,
                self.fill_id,
            )
        cache = hf.repeat_cache(cache, k, detach=detach_cache)
        h = self.thought_pass(block, cache, L, first_block=0, positions=positions)
        return thoughts, h
