"""Analyses that load a trial's final model: the content control (the same model with its own
thoughts and with a content-free pause thought) and the highest-reward thoughts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qstar.analysis import files
from qstar.analysis.evidence_arms import Arm
from qstar.analysis.evidence_estimates import Row, _all, _combine
from qstar.config import ObjectiveConfig
from qstar.core import learn, positions
from qstar.core.model import QuietStar
from qstar.data import collate
from qstar.run_config import load_run_config


def _final_key(run_dir: Path) -> str | None:
    """What identifies the trial's final model (size and time of its weights); ``None`` when the
    run directory has none (a report's data bundle, an unfinished run)."""
    weights = next(iter(sorted((run_dir / "final").glob("*.safetensors"))), None)
    if weights is None:
        return None
    return f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}"


def _cached(run_dir: Path, name: str, key: str | None) -> dict | None:
    """``RUN_DIR/analysis/NAME[.gz]``: with the final model present, only when made from it;
    without it (a data bundle), whatever was cached."""
    path = run_dir / "analysis" / name
    if not files.exists(path):
        return None
    saved = files.read_json(path)
    return saved if key is None or saved.get("key") == key else None


def _cache(run_dir: Path, name: str, value: dict) -> dict:
    """Write ``value`` to the cache and return it as read back (so a report made now and one
    made later from the cache see the same numbers)."""
    text = json.dumps(value, default=lambda v: v.item())  # NumPy scalars as Python numbers
    path = run_dir / "analysis" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return json.loads(text)


def content_control(run_dir: Path, batch_size: int = 8) -> dict[str, list[np.ndarray]] | None:
    """Per-token held-out NLL of the trial's final model without thinking (``base``), after its
    greedy thought (``thought``) and after a content-free thought that repeats the pause token
    ``---`` (``fixed``): the same mixing head and passes, nothing to think; for a model with a
    gate also ``gated``: its thought only at the positions the gate ranks in the top
    ``think_fraction`` of each window (as in training), the no-thought prediction elsewhere,
    which is what thinking only where the gate says costs and gives. In fp32; cached in
    ``RUN_DIR/analysis/content_control.json`` (keyed by the final model file), which is all a
    report's data bundle has."""
    run_dir = Path(run_dir)
    key = _final_key(run_dir)
    saved = _cached(run_dir, "content_control.json", key)
    windows_file = run_dir / "heldout.json"
    if saved is None and (key is None or not windows_file.is_file()):
        return None
    if saved is None:
        windows = json.loads(windows_file.read_text())["windows"]
        if not windows:
            return None
        fraction = run_objective(run_dir).think_fraction
        tokens = _content_tokens(run_dir / "final", windows, batch_size, fraction)
        saved = _cache(
            run_dir,
            "content_control.json",
            {"key": key, "tokens": {k: [w.tolist() for w in v] for k, v in tokens.items()}},
        )
    return {k: [files.floats(w, saved) for w in v] for k, v in saved["tokens"].items()}


def _content_tokens(
    final: Path, windows: list, batch_size: int, fraction: float = 1.0
) -> dict[str, list[np.ndarray]]:
    qs = QuietStar.from_pretrained(final).eval()
    pause = qs.tokenizer.encode(qs.config.meta_init_text, add_special_tokens=False)[0]
    out: dict[str, list[np.ndarray]] = {"base": [], "thought": [], "fixed": []}
    if qs.gate_head is not None:
        out["gated"], out["gate"] = [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids, mask = collate(windows[i : i + batch_size], qs.fill_id)
            valid = (mask[:, 1:] & mask[:, :-1]).bool()
            scored = {  # log p(x_{i+1}) through the fused head: no (B, L, V) logits
                "base": qs.next_token_logprobs(ids, mask, think=False),
                "thought": qs.next_token_logprobs(ids, mask),
                "fixed": qs.next_token_logprobs(ids, mask, fixed_thought=pause),
            }
            if qs.gate_head is not None:
                scored["gated"], gate = _gated(qs, ids, mask, fraction, scored)
                out["gate"] += [row[v].double().numpy() for row, v in zip(gate, valid, strict=True)]
            for name, lp in scored.items():
                nll = -lp
                out[name] += [row[v].double().numpy() for row, v in zip(nll, valid, strict=True)]
    return out


def _gated(qs: QuietStar, ids, mask, fraction: float, scored: dict):
    """``(B, L-1)`` log-probabilities with the thought where the gate chooses (its top
    ``fraction`` of each window's positions, :func:`qstar.core.positions.choose`), without it
    elsewhere (a thought at ``p`` depends on ``x_0..x_p`` alone, so it is the all-positions
    one), and ``(B, L-1)`` the gate's predicted gain at each position."""
    h = qs.backbone_pass(ids, attention_mask=mask).last_hidden_state
    score = qs.gate_head(h)
    chosen = positions.choose("gate", fraction, mask.bool(), gate_score=score)
    thinks = torch.zeros_like(scored["base"], dtype=torch.bool).scatter(1, chosen, True)
    return torch.where(thinks, scored["thought"], scored["base"]), score[:, :-1].float()


def top_thoughts(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """:func:`token_losses_and_thoughts`, cached in ``RUN_DIR/analysis/top_thoughts.json`` (keyed
    by the final model file). A ``ValueError``/``OSError`` is cached too, as its first line, and
    raised again as ``ValueError`` where only the cache is (a report's data bundle). ``None``
    when there is neither a final model nor a cache."""
    run_dir = Path(run_dir)
    key = _final_key(run_dir)
    saved = _cached(run_dir, "top_thoughts.json", key)
    if saved is not None and "error" in saved and key is not None:
        saved = None  # an error is retried where the model is
    if saved is None:
        if key is None:
            return None
        try:
            losses, thoughts = token_losses_and_thoughts(run_dir)
        except (ValueError, OSError) as exc:
            saved = _cache(run_dir, "top_thoughts.json", {"key": key, "error": _line(exc)})
        else:
            value = {
                "key": key,
                "losses": losses.to_dict(orient="list"),
                "thoughts": thoughts.to_dict(orient="records"),
            }
            saved = _cache(run_dir, "top_thoughts.json", value)
    if "error" in saved:
        raise ValueError(saved["error"])
    return pd.DataFrame(saved["losses"]), pd.DataFrame(saved["thoughts"])


def _line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def per_window(seeds: list[dict[str, list[np.ndarray]]], fn) -> Row:
    """``fn(tokens, window) -> per-token values`` over every window of each seed's content-control
    tokens (:func:`content_control`), bootstrapped over windows and averaged over seeds."""
    return _combine([_all([fn(t, w) for w in range(len(t["base"]))]) for t in seeds])


def content_table(arms: list[Arm]) -> pd.DataFrame:
    """Per arm (final models): the gain of its thoughts, of a content-free pause thought, and the
    difference -- what the thoughts' *content* adds -- each bootstrapped over windows."""
    rows = []
    for arm in arms:
        if arm.baseline:
            continue
        per_seed = [content_control(d) for d in arm.trials.values()]
        per_seed = [t for t in per_seed if t is not None]
        if not per_seed:
            continue
        rows.append(
            {
                "arm": arm.label,
                "seeds": len(per_seed),
                "gain, its thoughts": per_window(
                    per_seed, lambda t, w: t["base"][w] - t["thought"][w]
                ),
                "gain, pause thought": per_window(
                    per_seed, lambda t, w: t["base"][w] - t["fixed"][w]
                ),
                "content: pause - its thoughts": per_window(
                    per_seed, lambda t, w: t["fixed"][w] - t["thought"][w]
                ),
            }
        )
    return pd.DataFrame(rows)


def run_objective(run_dir: Path) -> ObjectiveConfig:
    """The objective a run trained with (its ``config.yaml``; the authors' where it has none)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return ObjectiveConfig()
    return load_run_config(str(config)).quiet_star.objective()


def token_losses_and_thoughts(run_dir: Path, n_windows: int = 4, seed: int = 0, top: int = 8):
    """Per-token base and post-thought NLL on held-out windows, and the highest-reward thoughts.

    Uses the trial's final model; thoughts for the loss table are greedy, those for the reward
    table are sampled (``k`` per position, seeded) as in training.
    """
    saved = run_dir / "heldout.json"
    if not saved.is_file():
        raise ValueError(
            f"{run_dir.name} has no heldout.json (the windows qstar train evaluated on)"
        )
    qs = QuietStar.from_pretrained(run_dir / "final").eval()
    windows = json.loads(saved.read_text())["windows"][:n_windows]
    if not windows:
        raise ValueError(f"{run_dir} has no held-out windows to analyse")
    ids, mask = collate(windows, qs.fill_id)
    loss_rows, thought_rows = [], []
    with torch.no_grad():
        valid = (mask[:, 1:] & mask[:, :-1]).bool()
        b = -qs.next_token_logprobs(ids, mask, think=False)
        m = -qs.next_token_logprobs(ids, mask)
        for w, i in valid.nonzero().tolist():
            loss_rows.append(
                {
                    "window": w,
                    "position": i,
                    "base_nll": float(b[w, i]),
                    "thought_nll": float(m[w, i]),
                }
            )
        objective = run_objective(run_dir)
        gen = torch.Generator().manual_seed(seed)
        out = qs(
            ids,
            attention_mask=mask,
            generator=gen,
            policy_temperature=objective.policy_temperature,
        )
        r = learn.quiet_star_loss(out, objective).rewards  # (B, k, L)
    flat = [
        (float(r[w, s, i]), w, s, i)
        for w, s, i in (out.target_valid[..., 0].expand_as(r)).nonzero().tolist()
    ]
    decode = qs.tokenizer.decode
    for reward, w, s, i in sorted(flat, reverse=True)[:top]:
        n_true = qs.config.n_true
        thought_rows.append(
            {
                "reward": reward,
                "context": decode(ids[w, max(0, i - 11) : i + 1].tolist()),
                "thought": decode(out.thoughts[w, s, i].tolist()),
                "next tokens": decode(ids[w, i + 1 : i + 1 + n_true].tolist()),
            }
        )
    return pd.DataFrame(loss_rows), pd.DataFrame(thought_rows)
