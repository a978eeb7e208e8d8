"""Sweep files: a base config plus a search space, expanded into an explicit list of trials.

A sweep file (YAML, strict keys)::

    name: thought_length                  # default: the file's stem
    base: paper_mistral7b_owm             # a shipped config name or a YAML path (relative to this file)
    overrides: [train.steps=100]          # for every trial (same grammar as `qstar train`)
    paired:                               # one axis that sets several keys together
      thought:
        - {quiet_star.thought_len: 5, quiet_star.n_true: 4}
        - {train.objective: lm}           # the no-thought baseline
    grid: {quiet_star.n_thoughts: [2, 4]} # cartesian product
    random: {optim.lr: {loguniform: [1.0e-6, 1.0e-4]}}   # also uniform, randint, choice
    num_samples: 1                        # random draws per grid point
    seeds: [0, 1]                         # train.seed axis
    metric: eval/nll_thought
    mode: min
    scheduler: {type: asha, grace_period: 10, reduction_factor: 2}
    resources: {cpu: 2, gpu: 0}            # per trial; with workers: N, per worker of a Ray Train
                                          # run of N processes (train.parallel: ddp or fsdp)
    max_concurrent: null
    tasks: [qstar_gsm8k_paper_local]      # -> eval.tasks of every trial
    limit: 50                             # -> eval.limit
    smoke: {overrides: [...], ...}        # replaces top-level keys under --smoke

Expansion (pure, no Ray): paired x grid x random samples x seeds, in that order, each trial
validated as a full :class:`qstar.run_config.RunConfig` before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qstar.data import DataError, announce, resolve
from qstar.models.loading import ModelLoadError, resolve_model
from qstar.overrides import did_you_mean
from qstar.recipes import registry
from qstar.run_config import RunConfig, load_run_config, resolve_config

SWEEP_KEYS = {
    "name",
    "description",
    "base",
    "overrides",
    "paired",
    "grid",
    "random",
    "num_samples",
    "seeds",
    "metric",
    "mode",
    "scheduler",
    "resources",
    "max_concurrent",
    "tasks",
    "limit",
    "smoke",
    "seed",
}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SCHEDULERS = ("asha",)


@dataclass
class Trial:
    trial_id: str
    overrides: list[str]  # the trial's own key=value settings (after the sweep's overrides)
    params: dict[str, Any]  # the varying values, for tables and plots

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "overrides": self.overrides, "params": self.params}


@dataclass
class Sweep:
    name: str
    path: Path
    base: str
    overrides: list[str]
    trials: list[Trial]
    metric: str = "eval/nll_thought"
    mode: str = "min"
    scheduler: dict[str, Any] | None = None
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_concurrent: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    workers: int = 1  # processes per trial: >1 runs each trial as a Ray Train job

    def run_config(self, trial: Trial, extra: list[str] = ()) -> RunConfig:
        return load_run_config(self.base, [*self.overrides, *trial.overrides, *extra])


def _fail(path: Path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _fmt(value: Any) -> str:
    """A value as it appears in trial ids: readable and unambiguous (``1e4``, ``1e-6``, ``0.5``).

    The id's character filter turns ``+`` into ``_``, so ``1e+04`` would read as ``1e_04``."""
    if isinstance(value, float):
        text = f"{value:.3g}"
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}e{int(exponent)}" if e else text
    return str(value)


def _override(key: str, value: Any) -> str:
    if isinstance(value, list | dict):
        return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
    return f"{key}={value}"


def _as_overrides(path: Path, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [_override(k, v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _fail(
        path, "overrides must be a list of key=value strings or a mapping of keys to values"
    )


def _resolve_base(path: Path, base: Any) -> str:
    if not isinstance(base, str) or not base:
        raise _fail(path, "base must name a shipped config or a YAML file")
    local = (path.parent / base).expanduser()
    if local.is_file():
        return str(local.resolve())
    try:
        return str(Path(resolve_config(base)).resolve())
    except FileNotFoundError as exc:
        raise _fail(path, f"base: {exc}") from None


def _sample(path: Path, key: str, spec: Any, rng: random.Random) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise _fail(
            path, f"random.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise _fail(path, f"random.{key}.choice needs a non-empty list")
        return rng.choice(args)
    if not isinstance(args, list) or len(args) != 2:
        raise _fail(path, f"random.{key}.{kind} needs [low, high]")
    lo, hi = (float(a) for a in args)
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise _fail(
            path, f"random.{key}.{kind} needs 0 < low < high for loguniform, low < high otherwise"
        )
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(int(lo), int(hi))


def load_sweep(path: str | Path, smoke: bool = False) -> Sweep:
    """Parse, expand and validate a sweep file; raises ``ValueError`` naming file and key."""
    path = Path(path)
    raw, data = _read_sweep_file(path, smoke)
    base = _resolve_base(path, data.get("base"))
    overrides = _as_overrides(path, data.get("overrides"))
    if data.get("tasks"):
        overrides.append(_override("eval.tasks", list(data["tasks"])))
    if data.get("limit") is not None:
        overrides.append(f"eval.limit={int(data['limit'])}")
    sweep = Sweep(
        name=str(data.get("name") or path.stem) + ("-smoke" if smoke else ""),
        path=path.resolve(),
        base=base,
        overrides=overrides,
        trials=_expand_trials(path, data),
        metric=str(data.get("metric", "eval/nll_thought")),
        mode=str(data.get("mode", "min")),
        scheduler=data.get("scheduler"),
        max_concurrent=data.get("max_concurrent"),
        raw=raw,
    )
    if sweep.mode not in ("min", "max"):
        raise _fail(path, f"mode must be min or max, got {sweep.mode!r}")
    sweep.resources, sweep.workers = _resources(path, data.get("resources") or {})
    _check_scheduler(path, sweep.scheduler)
    _check_trials(path, sweep)
    return sweep


def _read_sweep_file(path: Path, smoke: bool) -> tuple[dict, dict]:
    """``(raw, data)``: the file as written and with its ``smoke:`` section applied (``smoke``)."""
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _fail(path, f"invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "the top level must be a mapping")
    data = copy.deepcopy(raw)
    if smoke:
        if not isinstance(data.get("smoke"), dict):
            raise _fail(path, "has no smoke: section, so --smoke cannot apply")
        smoke_part = data["smoke"]
        for key in smoke_part:
            if key not in SWEEP_KEYS - {"smoke"}:
                raise _fail(
                    path,
                    f"unknown key smoke.{key}; valid: {', '.join(sorted(SWEEP_KEYS - {'smoke'}))}",
                )
        data.update(smoke_part)
    for key in data:
        if key not in SWEEP_KEYS:
            raise _fail(
                path,
                f"unknown sweep key {key!r}{did_you_mean(key, SWEEP_KEYS)}"
                f"; valid: {', '.join(sorted(SWEEP_KEYS))}",
            )
    return raw, data


def _expand_trials(path: Path, data: dict) -> list[Trial]:
    """The product of the paired, grid and seeds axes, times ``num_samples`` draws of ``random``."""
    axes: list[list[dict[str, Any]]] = []
    for axis, entries in (data.get("paired") or {}).items():
        if (
            not isinstance(entries, list)
            or not entries
            or not all(isinstance(e, dict) and e for e in entries)
        ):
            raise _fail(path, f"paired.{axis} must be a non-empty list of {{key: value}} mappings")
        axes.append([dict(e) for e in entries])
    for key, values in (data.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key} is empty; give a non-empty list of values")
        axes.append([{key: v} for v in values])
    random_space = data.get("random") or {}
    num_samples = int(data.get("num_samples", 1))
    if num_samples < 1:
        raise _fail(path, f"num_samples must be >= 1, got {num_samples}")
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise _fail(path, "seeds must be a non-empty list of integers")
        axes.append([{"train.seed": int(s)} for s in seeds])
    rng = random.Random(int(data.get("seed", 0)))

    trials: list[Trial] = []
    for combo in itertools.product(*axes) if axes else [()]:
        for _ in range(num_samples if random_space else 1):
            params: dict[str, Any] = {}
            for part in combo:
                params.update(part)
            for key, spec in random_space.items():
                params[key] = _sample(path, key, spec, rng)
            label = "-".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())
            trial_id = f"t{len(trials):03d}" + (f"-{label}" if label else "")
            trial_id = re.sub(r"[^A-Za-z0-9._=-]+", "_", trial_id)[:120]
            trials.append(Trial(trial_id, [_override(k, v) for k, v in params.items()], params))
    return trials


def _resources(path: Path, res: Any) -> tuple[dict[str, float], int]:
    """``({"cpu", "gpu"}, workers)`` of a trial, checked."""
    keys = ("cpu", "gpu", "workers")
    unknown = sorted(map(str, set(res) - set(keys))) if isinstance(res, dict) else [""]
    if unknown:
        raise _fail(
            path,
            f"resources must be a mapping with cpu, gpu and/or workers; got {res!r}"
            + did_you_mean(unknown[0], keys),
        )
    try:
        resources = {"cpu": float(res.get("cpu", 1)), "gpu": float(res.get("gpu", 0))}
        workers = res.get("workers", 1)
        if isinstance(workers, bool) or int(workers) != workers:
            raise ValueError
    except (TypeError, ValueError):
        raise _fail(path, f"resources need numbers (workers a whole number), got {res!r}") from None
    if resources["cpu"] <= 0 or resources["gpu"] < 0 or workers < 1:
        raise _fail(path, f"resources need cpu > 0, gpu >= 0 and workers >= 1, got {res!r}")
    return resources, int(workers)


def _check_scheduler(path: Path, scheduler: Any) -> None:
    if scheduler is None:
        return
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULERS:
        raise _fail(path, f"scheduler.type must be one of {list(SCHEDULERS)}")
    unknown = set(scheduler) - {"type", "grace_period", "reduction_factor", "max_t"}
    if unknown:
        raise _fail(
            path,
            f"unknown scheduler key(s) {sorted(unknown)}; valid: grace_period, reduction_factor, max_t",
        )


def _check_trials(path: Path, sweep: Sweep) -> None:
    """Every trial is a valid run config whose batch divides over its workers, or nothing runs."""
    for trial in sweep.trials:
        try:
            cfg = sweep.run_config(trial)
            registry.recipe_for(cfg)  # the method exists and its settings fit together
        except (ValueError, FileNotFoundError) as exc:
            raise _fail(path, f"trial {trial.trial_id}: {exc}") from None
        per_step = cfg.train.micro_batch_size * sweep.workers
        if cfg.train.batch_size % per_step:
            raise _fail(
                path,
                f"trial {trial.trial_id}: train.batch_size ({cfg.train.batch_size}) must be a "
                f"multiple of micro_batch_size x resources.workers ({per_step})",
            )


def describe(sweep: Sweep) -> str:
    """The expanded trial list, one line per trial (``qstar sweep --dry-run``)."""
    lines = [
        f"sweep {sweep.name}: {len(sweep.trials)} trials, base {sweep.base}",
        f"  overrides: {' '.join(sweep.overrides) or '-'}",
        f"  metric {sweep.metric} ({sweep.mode}), resources {sweep.resources}"
        + (f" x {sweep.workers} Ray Train workers" if sweep.workers > 1 else "")
        + ", "
        f"scheduler {sweep.scheduler or 'none'}",
    ]
    for trial in sweep.trials:
        lines.append(f"  {trial.trial_id}: {' '.join(trial.overrides) or '(base)'}")
    return "\n".join(lines)


def preflight(sweep: Sweep) -> list[str]:
    """Resolve every distinct model and data source of the sweep once, before Ray starts.

    Returns one line per source that cannot be used (naming it and the fix); sources that fall
    back to a bundled sample are announced on stderr (:func:`qstar.data.announce`)."""
    problems: list[str] = []
    seen: set[tuple] = set()
    for trial in sweep.trials:
        cfg = sweep.run_config(trial)
        d = cfg.data
        checks: list[tuple] = [("model", cfg.model.name)]
        checks.append(("data", d.source, d.split, d.data_dir))
        if d.val_source:
            checks.append(("data", d.val_source, d.val_split or d.split, d.data_dir))
        for check in checks:
            if check in seen:
                continue
            seen.add(check)
            try:
                if check[0] == "model":
                    resolve_model(check[1])
                else:
                    announce(resolve(*check[1:]))
            except (ModelLoadError, DataError) as exc:
                problems.append(f"{trial.trial_id}: {exc}")
    return problems
