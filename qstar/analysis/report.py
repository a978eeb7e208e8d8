"""Experiments as tidy DataFrames, the paper's figures, and ``qstar report``.

An experiment directory is what ``qstar sweep`` writes (``trials.json``, ``trials/ID/``) or a
single ``qstar train`` run directory (one trial). Tables:

* ``steps``:  one row per (trial, step) of training metrics, the trial's resolved config joined
  in as ``cfg.SECTION.KEY`` columns and its varying parameters as plain columns;
* ``evals``:  one row per (trial, step, task, metric, value) -- held-out NLL rows have task
  ``heldout``; lm-eval rows come from ``eval/TASK/METRIC``;
* ``trials``: one row per trial: status, parameters, thought length, label.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from qstar.analysis.plotting import _plt, save
from qstar.recipes.tracking import flatten, run_status

HELDOUT = "heldout"
TRAIN_CURVES = ("base_nll", "mixed_nll", "policy_loss", "reward_mean", "mixing_weight_mean")
CURVE_LABELS = {
    "base_nll": "base NLL (nats/token)",
    "mixed_nll": "mixed NLL (nats/token)",
    "policy_loss": "policy loss",
    "reward_mean": "mean reward (nats)",
    "mixing_weight_mean": "mixing weight",
}


@dataclass
class Experiment:
    path: Path
    trials: pd.DataFrame
    steps: pd.DataFrame
    evals: pd.DataFrame
    configs: dict[str, dict[str, Any]]
    provenance: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def read_jsonl(path: Path, allow_partial_last: bool = True) -> tuple[list[dict], str | None]:
    """Rows of a JSON-lines file. A malformed line raises ``ValueError`` naming file and line; a
    crashed run's last partial line (no trailing newline) is dropped and reported instead."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, note = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise json.JSONDecodeError("not an object", line, 0)
            rows.append(row)
        except json.JSONDecodeError as exc:
            is_last_partial = i == len(lines) and not text.endswith("\n")
            if allow_partial_last and is_last_partial:
                note = f"{path}:{i}: dropped a partial last line (a crashed or killed run)"
                continue
            raise ValueError(f"{path}:{i}: malformed metrics row ({exc.msg})") from None
    return rows, note


def _trial_dirs(path: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    if (path / "trials.json").is_file():
        spec = json.loads((path / "trials.json").read_text())
        return [
            (t["trial_id"], path / "trials" / t["trial_id"], t["params"]) for t in spec["trials"]
        ]
    if (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
        return [(path.name, path, {})]
    raise FileNotFoundError(
        f"{path} is neither a sweep experiment (trials.json) nor a run directory (metrics.jsonl)"
    )


LABEL_KEYS = {"quiet_star.thought_len", "quiet_star.n_true", "train.objective", "train.seed"}


def label_of(cfg: dict[str, Any], params: dict[str, Any] | None = None) -> str:
    """``"4 thought tokens, n_true 2"``, plus any other varying parameter of the trial."""
    from qstar.experiments.sweep import _fmt

    extra = ", ".join(
        f"{k.split('.')[-1]} {_fmt(v)}"
        for k, v in (params or {}).items()
        if k not in LABEL_KEYS and not k.startswith(("eval.", "logging."))
    )
    if cfg.get("train", {}).get("objective") == "lm":
        base = "no thought (baseline)"
    else:
        qs = cfg.get("quiet_star", {})
        base = f"{qs.get('thought_len')} thought tokens, n_true {qs.get('n_true')}"
    return f"{base}, {extra}" if extra else base


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment (or one run) into tidy DataFrames; see the module docstring."""
    path = Path(path)
    notes: list[str] = []
    trial_rows, step_rows, eval_rows = [], [], []
    configs, provenance = {}, {}
    for trial_id, run_dir, params in _trial_dirs(path):
        cfg = (
            yaml.safe_load((run_dir / "config.yaml").read_text())
            if (run_dir / "config.yaml").is_file()
            else {}
        )
        configs[trial_id] = cfg
        if (run_dir / "run.json").is_file():
            provenance[trial_id] = json.loads((run_dir / "run.json").read_text())
        status = run_status(run_dir)
        baseline = cfg.get("train", {}).get("objective") == "lm"
        thought_len = 0 if baseline else cfg.get("quiet_star", {}).get("thought_len")
        trial_rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "label": label_of(cfg, params) if cfg else trial_id,
                "thought_len": thought_len,
                "baseline": baseline,
                "seed": cfg.get("train", {}).get("seed"),
                **params,
            }
        )
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows, note = read_jsonl(metrics)
        if note:
            notes.append(note)
        flat_cfg = {
            k: ",".join(map(str, v)) if isinstance(v, list) else v
            for k, v in flatten(cfg, "cfg.").items()
        }
        for row in rows:
            if row.get("kind") == "eval":
                for key, value in row.items():
                    if not key.startswith("eval/") or not isinstance(value, int | float):
                        continue
                    parts = key.split("/")
                    task, metric = (
                        (HELDOUT, parts[1]) if len(parts) == 2 else (parts[1], "/".join(parts[2:]))
                    )
                    eval_rows.append(
                        {
                            "trial_id": trial_id,
                            "step": row["step"],
                            "task": task,
                            "metric": metric,
                            "value": float(value),
                        }
                    )
            else:
                step_rows.append(
                    {
                        "trial_id": trial_id,
                        **{k: v for k, v in row.items() if k != "kind"},
                        **flat_cfg,
                    }
                )
    trials = pd.DataFrame(trial_rows)
    steps = pd.DataFrame(step_rows)
    evals = pd.DataFrame(eval_rows, columns=["trial_id", "step", "task", "metric", "value"])
    if not evals.empty:
        evals = evals.merge(
            trials[["trial_id", "label", "thought_len", "baseline", "seed"]], on="trial_id"
        )
    return Experiment(path, trials, steps, evals, configs, provenance, notes)


# ---------------------------------------------------------------------------- figures
def _trial_order(exp: Experiment) -> list[str]:
    t = exp.trials.sort_values(["baseline", "thought_len", "trial_id"], na_position="last")
    return list(t["trial_id"])


def fig_accuracy_vs_step(exp: Experiment, metrics=("soft_score", "acc")):
    """Figure 2 style: task accuracy against training step, one line per trial, baseline dashed."""
    plt = _plt()
    tasks = (
        sorted(t for t in exp.evals["task"].unique() if t != HELDOUT) if not exp.evals.empty else []
    )
    if not tasks:
        return None
    fig, axes = plt.subplots(
        len(tasks), len(metrics), figsize=(5.5 * len(metrics), 3.6 * len(tasks)), squeeze=False
    )
    for r, task in enumerate(tasks):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            for trial_id in _trial_order(exp):
                d = exp.evals[
                    (exp.evals.trial_id == trial_id)
                    & (exp.evals.task == task)
                    & (exp.evals.metric == metric)
                ]
                if d.empty:
                    continue
                d = d.sort_values("step")
                ax.plot(
                    d["step"],
                    d["value"] * 100,
                    marker="o",
                    linestyle="--" if d["baseline"].iloc[0] else "-",
                    label=d["label"].iloc[0],
                )
            ax.set_title(f"{task}: {metric}")
            ax.set_xlabel("training step")
            ax.set_ylabel(f"{metric} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(4, len(labels)),
            bbox_to_anchor=(0.5, -0.02),
        )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def final_values(exp: Experiment, task: str, metric: str) -> pd.DataFrame:
    """The last evaluation of each trial for ``task``/``metric``."""
    d = exp.evals[(exp.evals.task == task) & (exp.evals.metric == metric)]
    if d.empty:
        return d
    return d.sort_values("step").groupby("trial_id").tail(1)


def fig_final_vs_thought_tokens(exp: Experiment, metrics=("soft_score", "acc")):
    """Final accuracy against the number of thought tokens (0 = the baseline), spread over seeds."""
    plt = _plt()
    tasks = (
        sorted(t for t in exp.evals["task"].unique() if t != HELDOUT) if not exp.evals.empty else []
    )
    pairs = [(t, m) for t in tasks for m in metrics] or [(HELDOUT, "nll_base")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], pairs, strict=True):
        d = final_values(exp, task, metric)
        if d.empty:
            continue
        scale = 1 if task == HELDOUT else 100
        g = d.groupby("thought_len")["value"].agg(["mean", "std", "count"]).reset_index()
        g["std"] = g["std"].fillna(0.0)
        ax.errorbar(
            g["thought_len"], g["mean"] * scale, yerr=g["std"] * scale, marker="o", capsize=4
        )
        ax.set_xlabel("thought tokens (0 = no-thought baseline)")
        ax.set_ylabel(f"final {metric}" + (" (%)" if scale == 100 else ""))
        ax.set_title(
            f"{task}: {metric}"
            + (f" (n={int(g['count'].max())} seeds)" if g["count"].max() > 1 else "")
        )
    fig.tight_layout()
    return fig


def fig_training_curves(exp: Experiment, keys=TRAIN_CURVES):
    """Base NLL, mixed NLL, policy loss, mean reward and mixing weight against step."""
    plt = _plt()
    keys = [k for k in keys if k in exp.steps.columns]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    labels = dict(zip(exp.trials.trial_id, exp.trials.label, strict=True))
    for ax, key in zip(axes[0], keys, strict=True):
        for trial_id in _trial_order(exp):
            d = exp.steps[exp.steps.trial_id == trial_id].dropna(subset=[key])
            if not d.empty:
                ax.plot(d["step"], d[key], label=labels.get(trial_id, trial_id))
        ax.set_xlabel("training step")
        ax.set_ylabel(CURVE_LABELS.get(key, key))
        if key == "policy_loss":
            ax.set_yscale("symlog", linthresh=1e-4)
    handles, lab = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, lab, loc="lower center", ncol=min(4, len(lab)), bbox_to_anchor=(0.5, -0.04)
        )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def fig_where_thinking_helps(token_losses: pd.DataFrame, bins: int = 10):
    """Mean loss improvement (base - with thought) by the base model's per-token loss percentile."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    d = token_losses.copy()
    d["percentile_bin"] = pd.qcut(d["base_nll"].rank(method="first"), bins, labels=False)
    d["improvement"] = d["base_nll"] - d["thought_nll"]
    g = d.groupby("percentile_bin")["improvement"].agg(["mean", "sem"]).reset_index()
    x = (g["percentile_bin"] + 0.5) * (100 / bins)
    ax.bar(x, g["mean"], width=100 / bins * 0.85, yerr=g["sem"].fillna(0), capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("base-model token loss percentile (harder ->)")
    ax.set_ylabel("loss improvement with thought (nats)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- model-based analyses
def token_losses_and_thoughts(run_dir: Path, n_windows: int = 4, seed: int = 0, top: int = 8):
    """Per-token base and post-thought NLL on held-out windows, and the highest-reward thoughts.

    Uses the trial's final model; thoughts for the loss table are greedy, those for the reward
    table are sampled (``k`` per position, seeded) as in training.
    """
    import torch

    from qstar.core.model import QuietStar
    from qstar.data import collate

    saved = run_dir / "heldout.json"
    if not saved.is_file():
        raise ValueError(f"{run_dir} has no heldout.json (the windows qstar train evaluated on)")
    qs = QuietStar.from_pretrained(run_dir / "final").eval()
    windows = json.loads(saved.read_text())["windows"][:n_windows]
    if not windows:
        raise ValueError(f"{run_dir} has no held-out windows to analyse")
    ids, mask = collate(windows, qs.fill_id)
    loss_rows, thought_rows = [], []
    with torch.no_grad():
        base = torch.log_softmax(qs.base_logits(ids, mask)[:, :-1].float(), -1)
        mixed = torch.log_softmax(qs.mixed_logits(ids, mask)[:, :-1].float(), -1)
        tgt = ids[:, 1:]
        valid = (mask[:, 1:] & mask[:, :-1]).bool()
        b = -base.gather(-1, tgt[..., None])[..., 0]
        m = -mixed.gather(-1, tgt[..., None])[..., 0]
        for w, i in valid.nonzero().tolist():
            loss_rows.append(
                {
                    "window": w,
                    "position": i,
                    "base_nll": float(b[w, i]),
                    "thought_nll": float(m[w, i]),
                }
            )
        out = qs(ids, attention_mask=mask, generator=torch.Generator().manual_seed(seed))
    r = out.rewards  # (B, k, L)
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


# ---------------------------------------------------------------------------- the report
_INT_COLUMNS = {
    "steps",
    "thought_len",
    "seed",
    "quiet_star.thought_len",
    "quiet_star.n_true",
    "quiet_star.n_thoughts",
    "train.seed",
}


def _md_table(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    if frame.empty:
        return "(none)\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float):
                cells.append(
                    ""
                    if math.isnan(v)
                    else str(int(v))
                    if c in _INT_COLUMNS
                    else format(v, floatfmt)
                )
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", "⏎"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_table(exp: Experiment) -> pd.DataFrame:
    """One row per trial: label, status, steps, final held-out NLL and task metrics."""
    rows = []
    for trial_id in _trial_order(exp):
        t = exp.trials[exp.trials.trial_id == trial_id].iloc[0]
        row: dict[str, Any] = {"trial": trial_id, "label": t["label"], "status": t["status"]}
        s = exp.steps[exp.steps.trial_id == trial_id] if not exp.steps.empty else exp.steps
        row["steps"] = int(s["step"].max()) if not s.empty else 0
        e = exp.evals[exp.evals.trial_id == trial_id] if not exp.evals.empty else exp.evals
        if not e.empty:
            last = e.sort_values("step").groupby(["task", "metric"]).tail(1)
            for _, r in last.iterrows():
                name = r["metric"] if r["task"] == HELDOUT else f"{r['task']} {r['metric']}"
                row[name] = r["value"]
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(
    exp_dir: str | Path,
    out: str | Path,
    analyse_model: bool = True,
    reading: str | Path | None = None,
) -> Path:
    """Write ``report.md`` and figures for an experiment; deterministic for the same inputs.

    ``reading``: a Markdown file with a written interpretation, placed under "Reading" (it is
    an input like the runs, so the report stays generated)."""
    exp = load_experiment(exp_dir)
    out = Path(out)
    figs_dir = out / "figures"
    sections = [f"# qstar report: {exp.path.name}", ""]
    for note in exp.notes:
        warnings.warn(note, stacklevel=2)
    if reading is not None:
        sections += ["## Reading", "", Path(reading).read_text().strip(), ""]
    evidence_sections = _evidence_sections(exp, figs_dir, analyse_model)
    sections += ["## Results", "", _md_table(results_table(exp)), ""]
    sections += evidence_sections
    figures = [
        (
            "accuracy_vs_step",
            "Task accuracy against training step (Figure 2 style)",
            fig_accuracy_vs_step(exp),
        ),
        (
            "final_vs_thought_tokens",
            "Final accuracy against thought tokens",
            fig_final_vs_thought_tokens(exp),
        ),
        ("training_curves", "Training curves", fig_training_curves(exp)),
    ]
    thoughts = None
    if analyse_model:
        candidates = exp.trials[(~exp.trials.baseline) & (exp.trials.status == "done")]
        if not candidates.empty:
            best = candidates.sort_values("thought_len").iloc[-1]
            run_dir = {t: d for t, d, _ in _trial_dirs(exp.path)}[best.trial_id]
            try:
                losses, thoughts = token_losses_and_thoughts(run_dir)
                figures.append(
                    (
                        "where_thinking_helps",
                        f"Where thinking helps ({best.label}, held-out windows)",
                        fig_where_thinking_helps(losses),
                    )
                )
            except (ValueError, OSError) as exc:  # e.g. a run whose data source is unreachable here
                exp.notes.append(f"model analyses skipped: {str(exc).splitlines()[0]}")
                warnings.warn(exp.notes[-1], stacklevel=2)
    for name, title, fig in figures:
        if fig is None:
            continue
        save(fig, figs_dir, name)
        sections += [f"## {title}", "", f"![{title}](figures/{name}.png)", ""]
    if thoughts is not None:
        sections += [
            "## Thoughts with the highest reward",
            "",
            "Held-out windows, sampled thoughts; reward = log-likelihood gain of the next tokens over "
            "the mean of the position's thoughts (nats).",
            "",
            _md_table(thoughts, ".3f"),
            "",
        ]
    sections += ["## Provenance", ""]
    prov_rows = []
    for trial_id, prov in sorted(exp.provenance.items()):
        prov_rows.append(
            {
                "trial": trial_id,
                "git_sha": (prov.get("git_sha") or "-")[:12],
                "dirty": prov.get("git_dirty"),
                "started": prov.get("started"),
                "model": prov.get("model"),
                "data": str(prov.get("data_source", ""))[-60:],
                "torch": prov.get("torch"),
                "transformers": prov.get("transformers"),
            }
        )
    sections += [_md_table(pd.DataFrame(prov_rows)), ""]
    versions = _task_versions(exp)
    if versions:
        sections += [
            "Task versions: " + ", ".join(f"`{k}` {v}" for k, v in sorted(versions.items())),
            "",
        ]
    sections += [
        "Configs: each trial's resolved `config.yaml` is in its run directory; the sweep's varying "
        "parameters:",
        "",
        _md_table(exp.trials.drop(columns=["label"], errors="ignore")),
        "",
    ]
    if exp.notes:
        sections += ["Notes: " + "; ".join(exp.notes), ""]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def _evidence_sections(exp: Experiment, figs_dir: Path, analyse_model: bool = True) -> list[str]:
    """ "Does it learn?": held-out and task estimates with intervals, when the runs saved
    per-token held-out losses (:mod:`qstar.evidence`); optimisation diagnostics when logged."""
    from qstar.analysis import evidence as ev

    run_dirs = {t: d for t, d, _ in _trial_dirs(exp.path) if d.is_dir()}
    arms = ev.arms_of(exp, run_dirs)
    out: list[str] = []
    if any(arm.steps() for arm in arms):
        held = ev.heldout_table(arms)
        tasks = ev.task_table(arms)
        out += [
            "## Does it learn?",
            "",
            "Held-out next-token NLL (nats/token) on windows never trained on, thoughts greedy. "
            "`gain` = without thinking - with thinking (> 0: thinking helps); `hardest 10%`: the "
            "tokens whose step-0 loss is in the top decile; `vs baseline` = the no-thought "
            "baseline's NLL - this arm's with thinking, same step (> 0: thinking beats training "
            "the plain LM on the same tokens); `drift` = NLL without thinking - its step-0 value "
            "(> 0: the language model got worse). Brackets: 95% percentile bootstrap over held-out "
            "windows (2000 resamples) of the values averaged over seeds; each seed's own value "
            "follows.",
            "",
            "### Findings",
            "",
            *[f"- {line}" for line in ev.findings(held, tasks)],
            "",
            "### Held-out text at the last step",
            "",
            _md_table(held.map(ev.fmt_cell) if not held.empty else held),
            "",
        ]
        curves = ev.curves(arms)
        for name, title, fig in (
            (
                "heldout_vs_step",
                "Held-out NLL and the gain of thinking against step",
                ev.fig_heldout_vs_step(curves),
            ),
            (
                "gain_vs_thought_tokens",
                "Final gain against thought tokens",
                ev.fig_gain_vs_thought_tokens(curves),
            ),
            (
                "gain_by_difficulty",
                "Gain by token difficulty (final step)",
                ev.fig_gain_by_difficulty(
                    {
                        a.label: ev.gain_by_difficulty(a, a.steps()[-1])
                        for a in arms
                        if not a.baseline and a.steps()
                    }
                ),
            ),
        ):
            if fig is not None:
                save(fig, figs_dir, name)
                out += [f"### {title}", "", f"![{title}](figures/{name}.png)", ""]
        if not curves.empty:
            wide = curves.pivot_table(
                index=["arm", "step"], columns="quantity", values="value", sort=False
            )
            out += [
                "Every evaluation (point estimates; intervals in `curves.csv`):",
                "",
                _md_table(wide.reset_index()),
                "",
            ]
            figs_dir.parent.mkdir(parents=True, exist_ok=True)
            curves.to_csv(figs_dir.parent / "curves.csv", index=False, float_format="%.6f")
        if analyse_model:
            content = ev.content_table(arms)
            if not content.empty:
                out += [
                    "### Does the content of the thought matter?",
                    "",
                    "Each arm's final model on the same held-out windows (fp32), with its own "
                    "greedy thought and with a content-free thought that repeats the pause token "
                    "`---` (the same mixing head and passes, nothing to think). `content` = NLL "
                    "with the pause thought - NLL with its thought (> 0: what the thoughts say "
                    "helps, beyond the extra computation and the mixing head).",
                    "",
                    _md_table(content.map(ev.fmt_cell)),
                    "",
                ]
        if not tasks.empty:
            out += [
                "### Tasks (paper protocol, zero-shot)",
                "",
                "Scores in [0, 1] at each arm's last task evaluation; brackets: 95% bootstrap over "
                "questions; `thinking - not` is paired on the same questions.",
                "",
                _md_table(tasks.map(ev.fmt_cell)),
                "",
            ]
    mix = ev.mixing_reward_table(exp)
    if not mix.empty:
        out += [
            "### Mixing weight and rewards over training",
            "",
            "Per-step means over an arm's seeds: the mixing head's output `w` (0 = the base "
            "prediction) and the REINFORCE rewards (nats; `reward_nonzero`: share of thoughts "
            "with a positive reward).",
            "",
            _md_table(mix, ".3g"),
            "",
        ]
    diag = ev.diagnostics_table(exp, run_dirs)
    if not diag.empty:
        out += [
            "## Optimisation diagnostics",
            "",
            "Medians over training steps: the gradient norm before clipping, the factor clipping "
            "multiplied it by, the REINFORCE term's gradient over the NLL terms' on the trunk, the "
            "mixing head's gradient norm after clipping, and each step's update over the weights' "
            "norm; then the fraction of trunk weights that differ from step 0 at the end and the "
            "held-out NLL without thinking at every evaluation (`NLL@step`).",
            "",
            _md_table(diag, ".3g"),
            "",
        ]
    return out


def _task_versions(exp: Experiment) -> dict[str, Any]:
    from qstar.evaluation.backend import TASK_DIR

    versions = {}
    tasks = set(exp.evals["task"]) - {HELDOUT} if not exp.evals.empty else set()
    for task in tasks:
        f = TASK_DIR / f"{task}.yaml"
        if f.is_file():
            text = f.read_text()
            for line in text.splitlines():
                if line.strip().startswith("version:"):
                    versions[task] = line.split(":", 1)[1].strip()
    return versions
