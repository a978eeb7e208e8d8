"""Ray Tune adapter: every Ray call of the project lives here.

Experiment directory (one per sweep, ``STORAGE/NAME``)::

    sweep.yaml          the sweep file as given
    trials.json         the expanded trial list (id, overrides, varying params)
    trials/TRIAL_ID/    each trial's qstar run directory (config.yaml, metrics.jsonl, checkpoints/,
                        final/, summary.json; error.txt when the trial failed)
    tune/               Ray Tune's experiment state (what --resume restores)
    train/TRIAL_ID/     Ray Train's state, for trials of several workers
    summary.csv         one row per trial: status, params, last metrics; rewritten as trials report

Each trial is one ``qstar train`` run. Its evaluations are reported to Tune with a small
checkpoint that points at the run's own checkpoint, so ASHA can stop it and a restarted sweep
resumes it from its last checkpoint (``qstar train --resume`` semantics) without copying weights.

With ``resources.workers: N`` (N > 1) a trial is a Ray Train job: the trial function launches a
``TorchTrainer`` of N workers (each with ``resources.cpu``/``gpu``), Ray Train joins them in one
process group and every worker runs ``qstar.recipes.train.train`` as under ``torchrun``, replicated or
sharded by ``train.parallel``. Workers report evaluations through Ray Train, which forwards
them to Tune (``TuneReportCallback``); the run directory is the same as for one process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qstar.errors import RunFailed
from qstar.experiments.sweep import Sweep
from qstar.recipes.train import train
from qstar.run_config import load_run_config
from qstar.runs.tracking import STATUS_ERROR, run_status


def check_resources(sweep: Sweep, address: str | None) -> None:
    """Fail before Ray starts when no single machine here could run one trial."""
    if address:
        return  # a cluster's resources are the cluster's to judge
    cpus = os.cpu_count() or 1
    n = sweep.workers
    per = "per trial" if n == 1 else f"x {n} workers"
    if sweep.resources["cpu"] * n > cpus:
        raise ValueError(
            f"resources.cpu={sweep.resources['cpu']:g} {per}, but this machine has {cpus} CPUs; "
            "lower it or pass --address of a Ray cluster"
        )
    if sweep.resources["gpu"] > 0:
        import torch

        have = torch.cuda.device_count()
        if sweep.resources["gpu"] * n > have:
            raise ValueError(
                f"resources.gpu={sweep.resources['gpu']:g} {per}, but this machine has {have} GPUs; "
                "set resources.gpu=0 or pass --address of a Ray cluster with GPUs"
            )


def write_summary(exp_dir: Path) -> Path:
    """Rewrite ``summary.csv`` from the trials' run directories (atomic)."""
    trials = json.loads((exp_dir / "trials.json").read_text())["trials"]
    rows, columns = [], ["trial_id", "status"]
    for t in trials:
        run_dir = exp_dir / "trials" / t["trial_id"]
        row: dict[str, Any] = {"trial_id": t["trial_id"], "status": run_status(run_dir)}
        row.update(t["params"])
        last_train, last_eval = {}, {}
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a killed trial's last partial line
                (last_eval if r.get("kind") == "eval" else last_train).update(r)
        row["step"] = last_train.get("step", 0)
        for key in ("base_nll", "mixed_nll", "policy_loss", "reward_mean", "mixing_weight_mean"):
            if key in last_train:
                row[key] = last_train[key]
        row.update({k: v for k, v in last_eval.items() if k.startswith("eval/")})
        if row["status"] == STATUS_ERROR:
            row["error"] = (run_dir / "error.txt").read_text().strip().splitlines()[-1][:200]
        row["run_dir"] = str(run_dir)
        for key in row:
            if key not in columns:
                columns.append(key)
        rows.append(row)
    path = exp_dir / "summary.csv"
    fd, tmp = tempfile.mkstemp(dir=exp_dir, prefix=".summary.")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _numbers(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    out = {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    out["step"] = step
    return out


@contextlib.contextmanager
def _error_kept(run_dir: Path, write: bool = True) -> Iterator[None]:
    """A failure inside the block leaves its traceback in ``run_dir/error.txt`` (unless one is there
    already: the first process to fail says why), then propagates. Interruptions leave none."""
    try:
        yield
    except BaseException as exc:
        error = run_dir / "error.txt"
        if write and not isinstance(exc, KeyboardInterrupt | SystemExit) and not error.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            error.write_text(traceback.format_exc())
        raise


def _train_worker(job: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-worker trial: ``qstar train`` in the job's process group."""
    import ray.train
    import torch

    torch.set_num_threads(max(1, int(job["cpus"])))
    run_dir = Path(job["run_dir"])
    cfg = load_run_config(job["base"], job["overrides"])
    rank = ray.train.get_context().get_world_rank()

    def report(step: int, metrics: dict[str, Any], ckpt: Path | None) -> None:
        ray.train.report(_numbers(step, metrics))  # every worker, the same rows (a barrier)

    with _error_kept(run_dir, write=rank == 0):
        train(cfg, run_dir, resume=job["resume"], on_eval=report)


def _make_trainable(sweep: Sweep, exp_dir: Path):
    """The function Ray runs for one trial (runs in a Ray worker process)."""
    base, sweep_overrides, cpus = sweep.base, list(sweep.overrides), sweep.resources["cpu"]
    gpus, workers = sweep.resources["gpu"], sweep.workers

    def run_ray_train(
        trial: dict[str, Any], run_dir: Path, overrides: list[str], resume: bool
    ) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "base": base,
                "overrides": overrides,
                "run_dir": str(run_dir),
                "resume": resume,
                "cpus": cpus,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(
                name=trial["trial_id"],
                storage_path=str(exp_dir / "train"),
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        trainer.fit()

    def run_trial(config: dict[str, Any]) -> None:
        import torch
        from ray import tune

        torch.set_num_threads(max(1, int(cpus)))
        trial = config["trial"]
        run_dir = exp_dir / "trials" / trial["trial_id"]
        overrides = [*sweep_overrides, *trial["overrides"], "logging.progress=false"]
        resume = (run_dir / "config.yaml").is_file()
        (run_dir / "error.txt").unlink(missing_ok=True)
        if workers > 1:
            with _error_kept(run_dir):  # kept if it failed before a worker could say why
                run_ray_train(trial, run_dir, overrides, resume)
            return
        cfg = load_run_config(base, overrides)

        def report(step: int, metrics: dict[str, Any], ckpt: Path | None) -> None:
            numbers = _numbers(step, metrics)
            if ckpt is None:
                tune.report(numbers)
                return
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "pointer.json").write_text(
                    json.dumps({"run_dir": str(run_dir), "checkpoint": str(ckpt), "step": step})
                )
                tune.report(numbers, checkpoint=tune.Checkpoint.from_directory(tmp))

        with _error_kept(run_dir):
            train(cfg, run_dir, resume=resume, on_eval=report)

    return run_trial


def _summary_callback(exp_dir: Path):
    from ray.tune import Callback

    class SummaryCallback(Callback):
        """Keep ``summary.csv`` current as trials report, finish or fail."""

        def _write(self) -> None:
            try:
                write_summary(exp_dir)
            except OSError as exc:  # never let bookkeeping kill the sweep
                print(f"qstar: could not update summary.csv: {exc}", file=sys.stderr)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._write()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write()

    return SummaryCallback()


def run_sweep(
    sweep: Sweep,
    storage: Path,
    address: str | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    verbose: int = 1,
):
    """Run (or resume) ``sweep`` under ``storage/sweep.name``; returns Tune's ResultGrid."""
    from ray import tune

    check_resources(sweep, address)
    exp_dir = (storage / sweep.name).resolve()
    _prepare_experiment(sweep, exp_dir, resume)
    _init_ray(address, verbose)
    # a multi-worker trial's own process only drives Ray Train: its workers hold the resources
    # (Tune needs some resource per trial: a token MiB of memory, not a CPU the workers need)
    trial_resources = sweep.resources if sweep.workers == 1 else {"cpu": 0, "memory": 2**20}
    trainable = tune.with_resources(_make_trainable(sweep, exp_dir), trial_resources)
    if resume and tune.Tuner.can_restore(str(exp_dir / "tune")):
        tuner = tune.Tuner.restore(
            str(exp_dir / "tune"),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_failed,
            restart_errored=False,
        )
        return _fit(tuner, exp_dir)
    scheduler = _asha_scheduler(sweep) if sweep.scheduler else None
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.to_dict() for t in sweep.trials])},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=scheduler,
            max_concurrent_trials=sweep.max_concurrent,
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(exp_dir),
            callbacks=[_summary_callback(exp_dir)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=verbose,
        ),
    )
    return _fit(tuner, exp_dir)


def _prepare_experiment(sweep: Sweep, exp_dir: Path, resume: bool) -> None:
    """Check ``exp_dir`` (resumed: the same trials; else new); write its sweep and trial files."""
    trials_file = exp_dir / "trials.json"
    expanded = {
        "name": sweep.name,
        "base": sweep.base,
        "overrides": sweep.overrides,
        "trials": [t.to_dict() for t in sweep.trials],
    }
    if resume:
        if not trials_file.is_file():
            raise ValueError(f"nothing to resume in {exp_dir}; run without --resume first")
        saved = json.loads(trials_file.read_text())
        if saved["trials"] != expanded["trials"] or saved["overrides"] != expanded["overrides"]:
            raise ValueError(
                f"{sweep.path} no longer expands to the trials of {exp_dir}; resume with the same sweep "
                "file and flags, or choose another --name"
            )
    elif trials_file.exists():
        raise ValueError(
            f"experiment {exp_dir} exists; pass --resume to continue it, or choose another --name"
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.copyfile(sweep.path, exp_dir / "sweep.yaml")
        trials_file.write_text(json.dumps(expanded, indent=2) + "\n")
    write_summary(exp_dir)


def _init_ray(address: str | None, verbose: int) -> None:
    """Start (or join, with ``address``) Ray unless this process already did."""
    import ray

    # trials see the driver's working directory
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "ignore_reinit_error": True,
            "log_to_driver": verbose > 1,
        }
        if address:
            kwargs["address"] = address
        else:
            # a local instance keeps Ray's default (token authentication on) without the warning
            # that announces it to every new user; --address clusters keep their own messages
            import logging

            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                logging.ERROR
            )
        ray.init(**kwargs)


def _asha_scheduler(sweep: Sweep):
    """The ASHA scheduler of the sweep file's ``scheduler:`` section."""
    from ray.tune.schedulers import ASHAScheduler

    steps = max(sweep.run_config(t).train.steps for t in sweep.trials)
    return ASHAScheduler(
        time_attr="step",
        max_t=int(sweep.scheduler.get("max_t", steps)),
        grace_period=int(sweep.scheduler.get("grace_period", 1)),
        reduction_factor=float(sweep.scheduler.get("reduction_factor", 2)),
    )


MEMORY_KILL = (
    "Ray's memory monitor killed a trial (the machine passed 95% of its memory) and Ray Tune "
    "stopped the whole sweep; finished trials and every checkpoint are kept: continue with "
    "qstar sweep FILE --resume, running fewer trials at once (max_concurrent, or more "
    "resources.cpu per trial) or with other memory-hungry programs stopped"
)


def _fit(tuner, exp_dir: Path):
    """``tuner.fit()``. When Ray's memory monitor kills a trial while one of its actor tasks is in
    flight, Ray Tune raises out of ``fit`` (an ``OutOfMemoryError`` it does not treat as a trial
    failure) and every other trial stops with it: say so in one line instead of a traceback."""
    try:
        grid = tuner.fit()
    except Exception as exc:
        cause = f"{exc!r} {exc.__cause__!r}"
        if "OutOfMemoryError" in cause or "running low on memory" in cause:
            write_summary(exp_dir)
            raise RunFailed(MEMORY_KILL) from None
        raise
    return _record_crashes(grid, exp_dir)


def _record_crashes(grid, exp_dir: Path):
    """A trial whose process died (SIGKILL, Ray's out-of-memory monitor) wrote no ``error.txt``;
    write Ray's one-line cause there, so the trial reads ``error`` and not ``stopped``."""
    for result in grid:
        if result.error is None:
            continue
        trial_id = (result.config or {}).get("trial", {}).get("trial_id")
        run_dir = exp_dir / "trials" / str(trial_id)
        if not trial_id or not run_dir.is_dir():
            continue
        if (run_dir / "error.txt").exists() or (run_dir / "summary.json").exists():
            continue
        lines = [ln.strip() for ln in str(result.error).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "killed" in ln.lower() or "memory" in ln.lower()), None)
        cause = f"{type(result.error).__name__}: {cause or (lines[0] if lines else '')}"
        (run_dir / "error.txt").write_text(
            "the trial's process died; continue it with qstar sweep FILE --resume --retry-failed "
            f"({cause[:120]})\n"
        )
    write_summary(exp_dir)
    return grid
