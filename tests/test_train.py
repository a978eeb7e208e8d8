"""Training recipe: run directory, metrics, checkpoints, resume == uninterrupted, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qstar.recipes.train import train
from qstar.runs.tracking import read_metrics

LOSS_KEYS = (
    "loss",
    "base_nll",
    "mixed_nll",
    "policy_loss",
    "reward_mean",
    "mixing_weight_mean",
    "lr",
    "grad_norm",
)


def _comparable(rows):
    return [
        {k: r[k] for k in r if k in LOSS_KEYS or k.startswith("eval/") or k in ("kind", "step")}
        for r in rows
    ]


def test_run_directory_layout_and_metrics(tmp_path, tiny_run_config):
    cfg = tiny_run_config()
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "summary.json",
        "final/qstar_config.json",
        "checkpoints/latest",
    ):
        assert (run / name).exists(), name
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, cfg.train.steps + 1))
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    for key in (
        "base_nll",
        "mixed_nll",
        "policy_loss",
        "reward_mean",
        "mixing_weight_mean",
        "tokens_per_s",
        "peak_mem_mb",
        "lr",
    ):
        assert key in train_rows[0]
    assert {"eval/nll_base", "eval/nll_thought", "eval/nll_delta"} <= set(eval_rows[0])
    assert train_rows[0]["lr"] == pytest.approx(cfg.optim.lr / cfg.optim.warmup_steps)
    provenance = json.loads((run / "run.json").read_text())
    assert provenance["git_sha"] is None or len(provenance["git_sha"]) == 40
    assert provenance["model_source"] == "tiny:llama"  # which weights, whatever the name
    assert provenance["data_origin"] in ("path", "builtin", "data_dir", "hub", "bundled")
    assert summary["eval_last"]["eval/nll_base"] < summary["eval_first"]["eval/nll_base"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_000004", "step_000006"]  # keep_checkpoints=2
    # per-token held-out losses behind every evaluation: their means are the logged NLLs
    for row in eval_rows:
        tokens = json.loads((run / "heldout" / f"step_{row['step']}.json").read_text())
        for key, name in (("base", "eval/nll_base"), ("thought", "eval/nll_thought")):
            flat = [v for window in tokens[key] for v in window]
            assert len(tokens[key]) == cfg.eval.windows
            assert sum(flat) / len(flat) == pytest.approx(row[name], rel=1e-6)
    # per-role gradient norms on every step; the roles' norms make up the total
    roles = ("trunk", "embeddings", "meta", "mixing_head")
    for r in train_rows:
        total = sum(r[f"grad_norm/{role}"] ** 2 for role in roles) ** 0.5
        assert total == pytest.approx(r["grad_norm"], rel=1e-4)
        assert r["grad_clip_coef"] == pytest.approx(
            min(1.0, cfg.optim.grad_clip / r["grad_norm"]), rel=1e-4
        )


def test_diagnostics_split_the_gradient_and_count_changed_weights(tmp_path, tiny_run_config):
    """grad_parts: policy + NLL parts add up to the total gradient; param_stats: update norms
    per role, and under pure bf16 at a tiny learning rate most trunk weights never move."""
    cfg = tiny_run_config(
        "logging.grad_parts=true", "logging.param_stats=true", "train.steps=4", "eval.every=2"
    )
    train(cfg, tmp_path / "a")
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "train"]
    assert steps[0]["grad_norm/policy/trunk"] == 0.0  # zero mixing weight at step 1: no reward
    later = steps[-1]
    assert later["grad_norm/policy/trunk"] > 0 and later["grad_norm/nll/trunk"] > 0
    for role in ("trunk", "embeddings", "mixing_head"):
        assert later[f"update_norm/{role}"] > 0
    changed = [r for r in rows if r["kind"] == "eval"][-1]
    assert changed["changed_frac/trunk"] > 0.99  # fp32 weights at lr 1e-3: all move

    frozen = tiny_run_config(
        "logging.param_stats=true",
        "train.steps=3",
        "train.precision=bf16",
        "optim.lr=1e-6",
        "optim.warmup_steps=0",
    )
    train(frozen, tmp_path / "b")
    last = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert last["changed_frac/trunk"] < 0.2  # updates below half a bf16 ulp round away
    assert last["changed_frac/meta"] > 0.5  # stored /100: small enough to move


def test_trainable_heads_keeps_the_language_model_fixed(tmp_path, tiny_run_config):
    summary = train(tiny_run_config("train.trainable=heads", "train.steps=3"), tmp_path / "run")
    assert summary["eval_last"]["eval/nll_base"] == pytest.approx(
        summary["eval_first"]["eval/nll_base"], abs=1e-6
    )
    assert summary["eval_last"]["eval/nll_delta"] != 0.0  # the head and meta tokens learned
    with pytest.raises(ValueError, match="trainable=heads"):
        train(tiny_run_config("train.trainable=heads", "train.objective=lm"), tmp_path / "lm")


def test_resume_equals_uninterrupted(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.checkpoint_every=0")
    train(cfg, tmp_path / "straight")
    first = train(cfg, tmp_path / "resumed", stop_after=3)
    assert first["stopped_at"] == 3
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert _comparable(a) == _comparable(b)
    # the summary covers the whole run, also when resumed (and resumed again at its end)
    for summary in (resumed, train(cfg, tmp_path / "resumed", resume=True)):
        for key in ("eval_first", "eval_last"):
            assert summary[key] == pytest.approx(straight[key]), key
        assert summary["final"]["loss"] == pytest.approx(straight["final"]["loss"])
    wa = load_file(str(tmp_path / "straight" / "checkpoints" / "step_000006" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000006" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_kill_then_resume_from_the_cli(tmp_path):
    """A real SIGKILL mid-run: the latest checkpoint stays loadable and --resume finishes."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "qstar.cli",
        "train",
        "debug_tiny",
        "--run-dir",
        str(run),
        "train.steps=12",
        "train.checkpoint_every=1",
        "logging.progress=false",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step_00000[3-9]")):
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert "resumed from" in done.stderr
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_existing_run_is_never_overwritten(tmp_path, tiny_run_config):
    cfg = tiny_run_config("train.steps=2")
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="different config"):
        train(tiny_run_config("train.steps=3"), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_no_thought_baseline_objective(tmp_path, tiny_run_config):
    summary = train(tiny_run_config("train.objective=lm", "train.steps=3"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "mixed_nll" not in rows[1] and "base_nll" in rows[1]
    assert "eval/nll_thought" not in summary["eval_last"]


def test_bad_data_row_names_file_and_line(tmp_path, tiny_run_config):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine row with words"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        train(tiny_run_config(f"data.source={data}"), tmp_path / "run")
    assert not (
        tmp_path / "run"
    ).exists()  # nothing written: fixing the data and rerunning just works
    from qstar.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        train(tiny_run_config("model.name=/no/such/model"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_help_and_bad_config(tmp_path):
    cli = [sys.executable, "-m", "qstar.cli"]
    out = subprocess.run([*cli, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout
    bad = subprocess.run(
        [*cli, "train", "debug_tiny", "quiet_star.thougth_len=3", "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "quiet_star.thougth_len" in bad.stderr and "did you mean 'thought_len'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2  # no traceback
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_compiled_layers_give_the_same_losses(tiny_run_config):
    """torch.compile of the decoder layers (slow on CPU: minutes of compilation)."""
    from qstar.cli import resolve_config  # noqa: F401
    from qstar.runs.build import build_model, compile_layers

    cfg = tiny_run_config()
    qs = build_model(cfg, torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 12))
    ref = qs(ids, generator=torch.Generator().manual_seed(0))
    assert compile_layers(qs) == 2
    out = qs(ids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.base_nll, ref.base_nll, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.mixed_nll, ref.mixed_nll, atol=1e-4, rtol=1e-4)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_run_config):
    from qstar.errors import TrainingDiverged

    cfg = tiny_run_config("optim.lr=10000.0", "optim.warmup_steps=0", "train.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: non-finite") as info:
        train(cfg, tmp_path / "run")
    assert "last good checkpoint" in str(info.value) and "\n" not in str(info.value)
    run = tmp_path / "run"
    assert not (run / "final").exists()  # no NaN model is saved
    from qstar.runs.checkpoint import latest

    good = latest(run)
    assert good is not None
    state = load_file(str(good / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    # skip mode rides through, counting, and gives up after skip_limit consecutive skips
    cfg = tiny_run_config(
        "optim.lr=10000.0", "optim.warmup_steps=0", "train.on_nonfinite=skip", "train.skip_limit=2"
    )
    with pytest.raises(TrainingDiverged, match="after 2 skipped steps"):
        train(cfg, tmp_path / "skip")
    rows = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] != []


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_disk_full_names_the_path_and_resume_works_once_space_is_freed(
    tmp_path, tiny_run_config, monkeypatch, where
):
    """ENOSPC while writing a checkpoint or metrics: one line naming the path, the previous
    checkpoint intact, and --resume finishes the run once the write succeeds again."""
    import errno

    from qstar.errors import WriteFailed
    from qstar.runs.tracking import MetricsLogger

    cfg = tiny_run_config("train.checkpoint_every=2", "eval.every=0")
    full = {"on": False}
    if where == "checkpoint":
        from qstar.runs import checkpoint as st

        real_save_model = st.save_model

        def save_model(model, path, *a, **k):
            if full["on"] and "step_000004" in path:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save_model(model, path, *a, **k)

        monkeypatch.setattr(st, "save_model", save_model)
    else:
        real_log = MetricsLogger.log

        def log(self, row):
            if full["on"] and row.get("step") == 4 and row.get("kind") == "train":
                self._fh = _Full(self._fh)
            return real_log(self, row)

        monkeypatch.setattr(MetricsLogger, "log", log)
    full["on"] = True
    run = tmp_path / "run"
    with pytest.raises(WriteFailed) as info:
        train(cfg, run)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert ("step_000004" in message) if where == "checkpoint" else ("metrics.jsonl" in message)
    from qstar.runs.checkpoint import latest

    assert latest(run).name == "step_000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left
    full["on"] = False
    summary = train(cfg, run, resume=True)
    assert summary["steps"] == cfg.train.steps and (run / "final").is_dir()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, cfg.train.steps + 1))


class _Full:
    """A file whose writes fail as on a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_crash_during_a_checkpoint_write_leaves_the_previous_one(
    tmp_path, tiny_run_config, monkeypatch
):
    """A process that dies half-way through writing checkpoint 4 (simulated by an exception
    between its files): no partial checkpoint, `latest` still names step 2, resume finishes."""
    from qstar.runs.checkpoint import latest

    real = torch.save
    crash = {"on": True}

    def save(obj, path, *a, **k):
        if crash["on"] and "step_000004" in str(path) and str(path).endswith("rng.pt"):
            raise SystemExit("simulated crash mid-checkpoint")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    cfg = tiny_run_config("train.checkpoint_every=2", "eval.every=0")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(cfg, run)
    assert latest(run).name == "step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    crash["on"] = False
    train(cfg, run, resume=True)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, cfg.train.steps + 1))


def test_torch_save_on_a_full_disk_reads_as_a_write_failure():
    """torch.save's zip writer does not raise OSError when the disk fills (seen here while
    checkpointing a sweep trial): its RuntimeErrors must still become the one-line WriteFailed."""
    from qstar.errors import is_write_error

    assert is_write_error(RuntimeError("basic_ios::clear: iostream error"))
    assert is_write_error(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1078963904 vs 1")
    )
    assert is_write_error(OSError(28, "No space left on device"))
    assert not is_write_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
