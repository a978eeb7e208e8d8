"""Sweep files expand and validate before Ray; sweeps survive failed trials and interruption."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qstar.experiments.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_sweeps_are_shipped():
    assert {p.stem for p in SHIPPED} >= {
        "thought_length",
        "lookahead",
        "n_thoughts",
        "mixing",
        "smoke",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True])
def test_every_shipped_sweep_expands(path, smoke):
    sweep = load_sweep(path, smoke=smoke)
    assert sweep.trials and len({t.trial_id for t in sweep.trials}) == len(sweep.trials)
    for trial in sweep.trials:
        sweep.run_config(trial)  # each trial is a valid run config


def test_figure2_grid_pairs_thought_length_with_lookahead():
    sweep = load_sweep(ROOT / "sweeps" / "thought_length.yaml")
    pairs = [
        (t.params.get("quiet_star.thought_len"), t.params.get("quiet_star.n_true"))
        for t in sweep.trials
    ]
    assert pairs == [(5, 4), (7, 4), (9, 4), (13, 8), (21, 12), (None, None)]
    assert sweep.trials[-1].params == {"train.objective": "lm", "train.seed": 0}
    cfg = sweep.run_config(sweep.trials[2])
    assert cfg.model.name == "mistralai/Mistral-7B-v0.1" and cfg.eval.tasks == [
        "qstar_gsm8k_paper",
        "qstar_csqa_paper",
    ]


def test_random_search_is_reproducible(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(
        "base: debug_tiny\nrandom:\n  optim.lr: {loguniform: [1.0e-5, 1.0e-3]}\nnum_samples: 3\n"
    )
    a, b = load_sweep(f), load_sweep(f)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert len({t.params["optim.lr"] for t in a.trials}) == 3
    assert all(1e-5 <= t.params["optim.lr"] <= 1e-3 for t in a.trials)


def test_trial_ids_spell_numbers_unambiguously(tmp_path):
    """``1e+04`` used to become ``1e_04`` in an id, which reads as 1e-04."""
    f = tmp_path / "s.yaml"
    f.write_text("base: debug_tiny\ngrid:\n  optim.lr: [10000.0, 1.0e-6, 0.5, 2.5e-5]\n")
    ids = [t.trial_id for t in load_sweep(f).trials]
    assert ids == ["t000-lr=1e4", "t001-lr=1e-6", "t002-lr=0.5", "t003-lr=2.5e-5"]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "grid:\n  quiet_star.thougth_len: [1, 2]\n",
            r"quiet_star.thougth_len.*did you mean 'thought_len'",
        ),
        ("grid:\n  quiet_star.thought_len: []\n", r"grid.quiet_star.thought_len is empty"),
        (
            "grid:\n  quiet_star.thought_len: [0]\n",
            r"quiet_star.thought_len must be an integer in \[1, 256\]",
        ),
        (
            "gird:\n  quiet_star.thought_len: [1]\n",
            r"unknown sweep key 'gird' \(did you mean 'grid'\?\)",
        ),
        ("random:\n  optim.lr: {normal: [0, 1]}\n", r"random.optim.lr must be one of"),
        ("scheduler: {type: pbt}\n", r"scheduler.type must be one of"),
        ("resources: {cpu: 1, wrkers: 2}\n", r"did you mean 'workers'"),
        ("resources: {workers: 1.5}\n", r"workers a whole number"),
        (
            "resources: {workers: 2}\noverrides: [train.batch_size=2, train.micro_batch_size=2]\n",
            r"multiple of micro_batch_size x resources.workers \(4\)",
        ),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text("base: debug_tiny\n" + body)
    with pytest.raises(ValueError, match=message):
        load_sweep(f)


def test_impossible_resources_fail_before_ray_starts(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("base: debug_tiny\nresources: {cpu: 4096}\n")
    out = subprocess.run(
        [sys.executable, "-m", "qstar.cli", "sweep", str(f), "--storage", str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "resources.cpu=4096" in out.stderr
    assert not (tmp_path / "e").exists()


def _rows(exp: Path) -> dict[str, dict]:
    with (exp / "summary.csv").open() as fh:
        return {r["trial_id"]: r for r in csv.DictReader(fh)}


def test_failed_trial_is_kept_and_the_sweep_continues(tmp_path, ray_session):
    from qstar.experiments import tune_adapter

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one good row with words"}\n{"text": oops}\n')
    f = tmp_path / "faults.yaml"
    f.write_text(
        f"base: debug_tiny\noverrides: [train.steps=2, eval.every=1]\n"
        f"grid:\n  data.source: [builtin:sample, {bad}]\nmetric: eval/nll_base\n"
    )
    sweep = load_sweep(f)
    tune_adapter.run_sweep(sweep, tmp_path / "exp", verbose=0)
    exp = tmp_path / "exp" / sweep.name
    rows = _rows(exp)
    good, failed = sweep.trials[0].trial_id, sweep.trials[1].trial_id
    assert rows[good]["status"] == "done" and float(rows[good]["eval/nll_base"]) > 0
    assert (
        rows[failed]["status"] == "error" and "bad.jsonl:2: invalid JSON" in rows[failed]["error"]
    )
    assert "DataError" in (exp / "trials" / failed / "error.txt").read_text()
    with pytest.raises(ValueError, match="--resume"):
        tune_adapter.run_sweep(sweep, tmp_path / "exp", verbose=0)


def test_sweep_exit_status_says_a_trial_diverged(tmp_path, ray_session, capsys):
    """A diverging trial ends `error` with the one-line cause; the others finish; exit 1."""
    from qstar.cli import main

    f = tmp_path / "div.yaml"
    f.write_text(
        "base: debug_tiny\noverrides: [train.steps=3, eval.every=3, optim.warmup_steps=0]\n"
        "grid:\n  optim.lr: [1.0e-3, 10000.0]\nmetric: eval/nll_base\n"
    )
    rc = main(["sweep", str(f), "--storage", str(tmp_path / "exp"), "--verbose", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    rows = _rows(tmp_path / "exp" / "div")
    assert rows["t000-lr=0.001"]["status"] == "done"
    bad = rows["t001-lr=1e4"]
    assert bad["status"] == "error" and "training diverged at step" in bad["error"]
    assert "trial t001-lr=1e4 failed: " in err and "1 of 2 trial(s) failed" in err


def test_memory_monitor_stopping_the_sweep_reads_one_line(
    tmp_path, ray_session, monkeypatch, capsys
):
    """Ray Tune raises out of fit() when Ray's memory monitor kills a trial mid-task (seen on
    this machine with two sweeps at once): one line saying what happened and how to continue,
    exit 1, the summary written; nothing started is lost."""
    from ray import exceptions, tune

    from qstar.cli import main

    def killed(self):
        try:
            raise exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low")
        except exceptions.OutOfMemoryError as exc:
            raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed") from exc

    monkeypatch.setattr(tune.Tuner, "fit", killed)
    f = tmp_path / "s.yaml"
    f.write_text("base: debug_tiny\noverrides: [train.steps=2]\ngrid:\n  optim.lr: [1.0e-3]\n")
    rc = main(["sweep", str(f), "--storage", str(tmp_path / "exp"), "--verbose", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Ray's memory monitor killed a trial" in err and "--resume" in err
    assert "Traceback" not in err
    assert _rows(tmp_path / "exp" / "s")["t000-lr=0.001"]["status"] == "pending"


def test_unreachable_sources_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Every distinct model and data source is resolved once, up front: one line each, exit 2,
    nothing written."""
    from qstar.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QSTAR_DATA_DIR", raising=False)
    f = tmp_path / "s.yaml"
    f.write_text(
        "base: debug_tiny\ngrid:\n  model.name: [tiny:llama, nosuch/model-xyz]\n"
        "  data.source: [builtin:sample, allenai/c4]\n"
    )
    rc = main(["sweep", str(f), "--storage", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "exp").exists()
    assert len(err) == 2  # c4 once, the model once: each distinct source is checked once
    assert "allenai/c4" in err[0] and "QSTAR_DATA_DIR" in err[0]
    assert "nosuch/model-xyz" in err[1]


def test_interrupted_sweep_resumes_and_keeps_finished_trials(tmp_path):
    f = tmp_path / "long.yaml"
    f.write_text(
        "name: long\nbase: debug_tiny\noverrides: [train.steps=24, eval.every=4, train.checkpoint_every=4]\n"
        "grid:\n  quiet_star.thought_len: [1, 2]\nresources: {cpu: 2}\nmetric: eval/nll_base\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "qstar.cli",
        "sweep",
        str(f),
        "--storage",
        str(tmp_path / "exp"),
        "--verbose",
        "0",
    ]
    exp = tmp_path / "exp" / "long"
    second = exp / "trials" / "t001-thought_len=2"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ)
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (second / "checkpoints" / "latest").exists():
        if proc.poll() is not None:
            pytest.fail(
                f"sweep ended before the interruption: {proc.stderr.read().decode()[-800:]}"
            )
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) == 130  # an interrupted sweep says so (make stops there)
    rows = _rows(exp)
    assert rows["t000-thought_len=1"]["status"] == "done"
    assert rows["t001-thought_len=2"]["status"] in ("stopped", "done")
    finished = (exp / "trials" / "t000-thought_len=1" / "metrics.jsonl").read_text()
    started = (second / "run.json").read_text()

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert {r["status"] for r in _rows(exp).values()} == {"done"}
    assert (
        exp / "trials" / "t000-thought_len=1" / "metrics.jsonl"
    ).read_text() == finished  # not rerun
    assert (
        second / "run.json"
    ).read_text() == started  # resumed from its checkpoint, not restarted
    steps = [
        json.loads(line)["step"]
        for line in (second / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 25))


def test_trial_with_two_workers_runs_under_ray_train(tmp_path, ray_session):
    """``resources.workers: 2``: each trial is a Ray Train job of two gloo workers (replicated or
    sharded) whose evaluations reach Tune; the plain-LM objective then equals one process."""
    from safetensors.torch import load_file

    from qstar.cli import resolve_config
    from qstar.experiments import tune_adapter
    from qstar.recipes.train import train
    from qstar.run_config import load_run_config

    common = [
        "train.objective=lm",
        "data.windowing=pack",
        "train.steps=4",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "eval.every=2",
    ]
    f = tmp_path / "workers.yaml"
    f.write_text(
        f"base: debug_tiny\noverrides: {common}\ngrid:\n  train.parallel: [ddp, fsdp]\n"
        "resources: {cpu: 1, workers: 2}\nmetric: eval/nll_base\n"
    )
    sweep = load_sweep(f)
    results = tune_adapter.run_sweep(sweep, tmp_path / "exp", verbose=0)
    assert not results.errors, results.errors
    for result in results:
        assert result.metrics["step"] == 4 and result.metrics["eval/nll_base"] > 0
    exp = tmp_path / "exp" / sweep.name
    assert {r["status"] for r in _rows(exp).values()} == {"done"}

    cfg = load_run_config(resolve_config("debug_tiny"), [*common, "logging.progress=false"])
    train(cfg, tmp_path / "one")
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step_000004" / "model.safetensors"))
    for trial in sweep.trials:
        run = exp / "trials" / trial.trial_id
        assert json.loads((run / "summary.json").read_text())["processes"] == 2
        two = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
        for key in one:
            assert (one[key] - two[key]).abs().max() < 1e-5, (trial.trial_id, key)


@pytest.mark.slow
def test_killed_trial_reads_error_and_resumes_with_retry_failed(tmp_path):
    """A trial process SIGKILLed mid-step (as Ray's memory monitor does): the trial ends `error`
    with Ray's cause, the other trial finishes, the sweep exits 1; --resume --retry-failed
    continues the killed one from its last checkpoint."""
    cmd, exp, proc = _sweep_until_the_second_trial_checkpoints(tmp_path)
    victim = exp / "trials" / "t001-thought_len=2"
    os.kill(json.loads((victim / "run.json").read_text())["pid"], signal.SIGKILL)
    assert proc.wait(timeout=300) == 1
    rows = _rows(exp)
    assert rows["t000-thought_len=1"]["status"] == "done"
    assert rows["t001-thought_len=2"]["status"] == "error"
    assert "--retry-failed" in rows["t001-thought_len=2"]["error"]
    started = (victim / "run.json").read_text()
    done = subprocess.run(
        [*cmd, "--resume", "--retry-failed"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert _rows(exp)["t001-thought_len=2"]["status"] == "done"
    assert (victim / "run.json").read_text() == started  # resumed, not restarted


@pytest.mark.slow
def test_killed_sweep_driver_resumes_every_trial_once(tmp_path):
    """SIGKILL of `qstar sweep` itself (no handler runs): Ray's workers go with it; --resume
    continues both trials from their checkpoints and every step is logged exactly once."""
    cmd, exp, proc = _sweep_until_the_second_trial_checkpoints(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(5)  # Ray's raylet notices its driver is gone and ends the trial workers
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-1500:]
    for trial in ("t000-thought_len=1", "t001-thought_len=2"):
        rows = (exp / "trials" / trial / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(r)["step"] for r in rows if json.loads(r)["kind"] == "train"]
        assert steps == list(range(1, 31)), trial
    assert {r["status"] for r in _rows(exp).values()} == {"done"}


def _sweep_until_the_second_trial_checkpoints(tmp_path):
    """Start a two-trial `qstar sweep` and wait until its second trial has a checkpoint."""
    f = tmp_path / "k.yaml"
    f.write_text(
        "name: k\nbase: debug_tiny\noverrides: [train.steps=30, eval.every=0, train.checkpoint_every=2]\n"
        "grid:\n  quiet_star.thought_len: [1, 2]\nresources: {cpu: 1}\nmetric: eval/nll_base\n"
    )
    cmd = [sys.executable, "-m", "qstar.cli", "sweep", str(f), "--storage", str(tmp_path / "exp")]
    exp = tmp_path / "exp" / "k"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and not (exp / "trials" / "t001-thought_len=2" / "checkpoints" / "latest").exists()
    ):
        if proc.poll() is not None:
            pytest.fail(f"sweep ended early: {proc.stderr.read().decode()[-800:]}")
        time.sleep(0.2)
    return cmd, exp, proc
