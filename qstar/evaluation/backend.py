"""lm-evaluation-harness adapter: the ``qstar`` model backend and runs (task lookup in
:mod:`qstar.evaluation.lookup`, result files and tables in :mod:`qstar.evaluation.results`).

Every lm-eval call of the project goes through this module (lm-eval's API moves between
releases). The backend scores with thoughts at every token (``QuietStar.mixed_logits``) or,
with ``think=False``, the base model through the same code path; ``generate_until`` thinks
before every emitted token (``QuietStar.generate``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qstar.core.model import QuietStar
from qstar.core.think import mask_meta_logits
from qstar.data import collate
from qstar.data import data_dir as _data_dir
from qstar.evaluation.lookup import TaskError, resolve_tasks


# ---------------------------------------------------------------------------- the model backend
def _register(name: str):
    """``register_model`` that tolerates re-import of this module (notebooks, reloads)."""
    from lm_eval.api.registry import model_registry

    def wrap(cls):
        try:
            return register_model(name)(cls)
        except (ValueError, AssertionError):
            if hasattr(model_registry, "_objs"):
                model_registry._objs[name] = cls  # type: ignore[attr-defined]
            return cls

    return wrap


@_register("qstar")
class QStarLM(TemplateLM):
    """lm-eval model ``qstar``: ``pretrained`` (hub id, directory, GGUF, run dir, QuietStar dir),
    ``think`` (default true), ``thought_len`` (inference override), ``greedy_thoughts`` (default
    true), ``seed``, ``batch_size``, ``max_length``, ``device``, ``dtype``; ``overrides``: any
    ``QuietStarConfig`` fields for inference (applied around each call with
    :meth:`QuietStar.using`, so a shared model is left as it was)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        think: bool = True,
        thought_len: int | None = None,
        greedy_thoughts: bool = True,
        seed: int = 0,
        batch_size: int | str = 4,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        overrides: dict | None = None,
        think_threshold: float | None = None,
        **kwargs,
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("qstar backend: pass pretrained=PATH_OR_ID")
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(dtype)]
            model = QuietStar.from_pretrained(
                resolve_model_path(str(pretrained)), dtype=torch_dtype
            )
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.qs = model
        # an inference-time override, applied around each call (the model may be shared)
        self.overrides = dict(overrides or {})
        if thought_len is not None:
            self.overrides["thought_len"] = int(thought_len)
        self.think = bool(think)
        self.greedy = bool(greedy_thoughts)
        self.threshold = None if think_threshold is None else float(think_threshold)
        if self.threshold is not None and model.gate_head is None:
            raise ValueError(
                "--think-threshold needs a model with a trained gate (quiet_star.gate=true); "
                f"{pretrained or 'this model'} has none"
            )
        self.gate_counts = {"positions": 0, "thought": 0}  # what the gate let think
        self.seed = int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 4
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = model.tokenizer
        cfg = model.base_model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        block = model.config.replace(**self.overrides).thought_block  # validates the override
        self._max_length = int(max_length or min(2048, limit - block - 1))

    # -- TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.qs.fill_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on (rolling log-likelihood, empty prompts): BOS
        where the tokenizer has one, else EOS -- as lm-eval's ``hf`` model does."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.qs.meta_embeddings.device

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _generator(self) -> torch.Generator | None:
        return None if self.greedy else torch.Generator().manual_seed(self.seed)

    def _text_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the text vocabulary: the meta tokens (which no text contains
        and the base model never had) are excluded, so that ``think=False`` scores exactly as
        lm-eval's ``hf`` model does on the same weights and thinking is compared on the same
        vocabulary."""
        masked = mask_meta_logits(logits.float(), (self.qs.start_id, self.qs.end_id))
        return torch.log_softmax(masked, dim=-1).cpu()

    def _logprobs(self, rows: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        with torch.no_grad(), self.qs.using(**self.overrides):
            return self._logprobs_now(rows, starts)

    def _logprobs_now(self, rows: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Log-probabilities ``(len(row) - start, V)`` of the next token at positions
        ``start..len(row)-1`` of each row.

        With greedy thoughts only those positions think (:meth:`QuietStar.mixed_logits_at`):
        a thought at position ``i`` depends on ``x_0..x_i`` alone, so the prompt's positions
        need no thoughts to score an answer after it."""
        ids, mask = collate(rows, self.qs.fill_id)  # right-padded
        ids, mask = ids.to(self.device), mask.to(self.device)
        width = max(len(r) - s for r, s in zip(rows, starts, strict=True))
        pos = torch.tensor(
            [
                [min(s + j, len(r) - 1) for j in range(width)]
                for r, s in zip(rows, starts, strict=True)
            ],
            device=self.device,
        )  # (B, width); short rows repeat their last position
        if self.think and self.greedy and self.threshold is not None:
            logits = self._gated_logits(ids, pos, mask)
        elif self.think and self.greedy:
            logits = self.qs.mixed_logits_at(ids, pos, mask)
        elif not self.think:  # the head on the scored positions only, not (B, L, V)
            qs = self.qs
            h = qs.backbone(inputs_embeds=qs.embed(ids), attention_mask=mask).last_hidden_state
            logits = qs.lm_logits(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
        if not self.think or self.greedy:
            lp = self._text_logprobs(logits)
            return [lp[i, : len(r) - s] for i, (r, s) in enumerate(zip(rows, starts, strict=True))]
        logits = self.qs.mixed_logits(ids, mask, greedy=self.greedy, generator=self._generator())
        lp = self._text_logprobs(logits)
        return [lp[i, s : len(r)] for i, (r, s) in enumerate(zip(rows, starts, strict=True))]

    def _gated_logits(self, ids, pos, mask) -> torch.Tensor:
        """Scored positions think where the gate predicts a gain of at least ``think_threshold``
        (the others keep the base prediction); counts what thought."""
        qs = self.qs
        h = qs.backbone_pass(ids, attention_mask=mask).last_hidden_state
        h_pos = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (B, w, H)
        logits = qs.lm_logits(h_pos)
        thinking = qs.gate_head(h_pos) >= self.threshold  # (B, w)
        self.gate_counts["positions"] += thinking.numel()
        self.gate_counts["thought"] += int(thinking.sum())
        if bool(thinking.any()):
            mixed = qs.mixed_logits_at(ids, pos, mask)
            logits = torch.where(thinking[..., None], mixed, logits)
        return logits

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score continuations; inputs that are prefixes of another input share its forward.

        Thoughts at position ``i`` depend on ``x_0..x_i`` only, so the logits of a prefix are
        the first rows of the longer input's logits (exactly so for greedy thoughts), and only
        the positions that score a continuation token are computed.
        """
        inputs = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append((tuple(whole[:-1]), cont))
        unique = sorted({inp for inp, _ in inputs})
        cover = {}
        longest = None
        for inp in reversed(unique):  # a prefix of anything is a prefix of its successor
            shareable = self.greedy or not self.think  # sampled thoughts depend on the batch layout
            if longest is None or not (shareable and longest[: len(inp)] == inp):
                longest = inp
            cover[inp] = longest
        start: dict[tuple, int] = {}  # first position of each root that scores a token
        for inp, cont in inputs:
            root = cover[inp]
            first = max(0, len(inp) - len(cont))
            start[root] = min(start.get(root, first), first)
        roots = sorted(start, key=len, reverse=True)
        computed = {}
        for i in range(0, len(roots), self.batch_size):
            chunk = roots[i : i + self.batch_size]
            rows = self._logprobs([list(r) for r in chunk], [start[r] for r in chunk])
            for root, lp in zip(chunk, rows, strict=True):
                computed[root] = lp
        out = []
        for inp, cont in inputs:
            root = cover[inp]
            lo = len(inp) - len(cont) - start[root]
            lp = computed[root][lo : lo + len(cont)]  # (len(cont), V)
            target = torch.tensor(cont)
            ll = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", None, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            results.append(sum(ll for ll, _ in scored))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            contexts = [r.args[0] for r in chunk]
            kwargs = dict(chunk[0].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode([self.eot_token_id])
            stops = [s for s in until + [eos_text] if s]
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            results += self._generate(
                contexts,
                stops,
                max_new,
                bool(kwargs.get("do_sample", False)),
                float(kwargs.get("temperature", 1.0) or 1.0),
            )
        return results

    @torch.no_grad()
    def _generate(
        self,
        contexts: list[str],
        stops: list[str],
        max_new: int,
        do_sample: bool,
        temperature: float,
    ):
        encoded = [
            self.tok_encode(c)[-(self.max_length - max_new) :] or [self.eot_token_id]
            for c in contexts
        ]
        # lm-eval's `repeats` (e.g. 8 sampled answers a question) arrive as consecutive copies
        # of one request: prefill each prompt once and continue it that many times
        counts: list[int] = []
        for i, e in enumerate(encoded):
            if i and e == encoded[i - 1]:
                counts[-1] += 1
            else:
                counts.append(1)
        starts = [sum(counts[:j]) for j in range(len(counts))]
        encoded = [encoded[s] for s in starts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.qs.fill_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding for generation
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1

        def stop(tokens: torch.Tensor) -> torch.Tensor:
            texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=False)
            return torch.tensor([any(s in t for s in stops) for t in texts])

        copies = None if len(counts) == len(contexts) else torch.tensor(counts)
        with self.qs.using(**self.overrides):
            new = self._generate_now(ids, mask, max_new, do_sample, temperature, stop, copies)
        out = []
        for row in new.tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            cut = min([text.index(s) for s in stops if s in text], default=len(text))
            out.append(text[:cut])
        return out

    def _generate_now(self, ids, mask, max_new, do_sample, temperature, stop, copies=None):
        stats: dict = {}
        try:
            return self._generate_gated(
                ids, mask, max_new, do_sample, temperature, stop, copies, stats
            )
        finally:
            for key in self.gate_counts:
                self.gate_counts[key] += stats.get(key, 0)

    def _generate_gated(self, ids, mask, max_new, do_sample, temperature, stop, copies, stats):
        return self.qs.generate(
            ids.to(self.device),
            mask.to(self.device),
            max_new_tokens=max_new,
            think=self.think,
            greedy_thoughts=self.greedy,
            do_sample=do_sample,
            temperature=temperature,
            generator=self._generator(),
            stop=stop,
            copies=copies,
            think_threshold=self.threshold if self.think else None,
            stats=stats,
        )


def resolve_model_path(name: str) -> str:
    """A run directory means its ``final/`` model; anything else is passed on."""
    path = Path(name).expanduser()
    if (path / "final" / "qstar_config.json").is_file():
        return str(path / "final")
    return name


# ---------------------------------------------------------------------------- runs
def evaluate(
    lm: QStarLM,
    tasks: list[str],
    limit: int | None = None,
    include_paths: list[str] | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks on a backend; returns lm-eval's results dict plus ``"timing"``."""
    import logging

    import lm_eval

    for name in ("lm_eval", "lm-eval"):  # its per-task notices drown the results on stderr
        logging.getLogger(name).setLevel(logging.ERROR)
    root = _data_dir(data_dir)
    data_dir = str(root) if root is not None else None
    specs, tm = resolve_tasks(tasks, include_paths, data_dir)
    t0 = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=tm,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except FileNotFoundError as exc:
        raise TaskError(str(exc).splitlines()[0]) from None
    elapsed = time.perf_counter() - t0
    n = sum(v.get("effective", 0) for v in (results.get("n-samples") or {}).values())
    results["timing"] = {
        "seconds": elapsed,
        "examples": n,
        "examples_per_s": n / elapsed if elapsed else None,
    }
    return results
