"""Several processes on CPU: two gloo processes launched by torchrun, replicated (DDP) or sharded
(FSDP)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qstar.runs.tracking import read_metrics


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _rows(run_dir, kind: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def _train(run_dir, nproc: int, *overrides: str):
    base = [
        sys.executable,
        "-m",
        "qstar.cli",
        "train",
        "debug_tiny",
        "--run-dir",
        str(run_dir),
        "logging.progress=false",
        *overrides,
    ]
    if nproc > 1:
        base = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "qstar.cli",
            *base[3:],
        ]
    out = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_two_process_data_parallel_equals_one_process(tmp_path):
    """The plain-LM objective has no sampling: 2 processes x 2 sequences must equal 1 x (2 x 2)."""
    common = [
        "train.objective=lm",
        "data.windowing=pack",
        "train.steps=3",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "eval.every=0",
        "eval.windows=0",
    ]
    _train(tmp_path / "one", 1, *common)
    _train(tmp_path / "two", 2, *common)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    la = [
        r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"
    ]
    lb = [
        r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert la == pytest.approx(lb, rel=1e-5)


def test_quiet_star_data_parallel_run(tmp_path):
    run = tmp_path / "run"
    _train(
        run,
        2,
        "train.steps=4",
        "train.batch_size=4",
        "train.micro_batch_size=1",
        "train.checkpoint_every=2",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["policy_loss"] >= 0 for r in rows)
    rng = torch.load(run / "checkpoints" / "step_000004" / "rng.pt", weights_only=True)
    assert len(rng["rank_generators"]) == 2 and not torch.equal(*rng["rank_generators"])
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "qstar.cli",
            "train",
            "debug_tiny",
            "--run-dir",
            str(tmp_path / "bad"),
            "logging.progress=false",
            "train.batch_size=2",
            "train.micro_batch_size=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "micro_batch_size x processes" in bad.stderr


LM_COMMON = [
    "train.objective=lm",
    "data.windowing=pack",
    "train.steps=4",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.checkpoint_every=2",
    "eval.every=0",
    "eval.windows=0",
]


def _cut_at(run_dir, to, step: int) -> None:
    """A copy of ``run_dir`` as if it had been killed right after checkpoint ``step``."""
    shutil.copytree(run_dir, to)
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    shutil.rmtree(to / "final")
    (to / "summary.json").unlink()


def test_fsdp_equals_one_process_and_resumes_on_any_process_count(tmp_path):
    """Sharded training of the plain-LM objective equals one process; its checkpoints are whole
    tensors, so an interrupted sharded run resumes sharded or on one process to the same weights."""
    fsdp = [*LM_COMMON, "train.parallel=fsdp"]
    _train(tmp_path / "one", 1, *fsdp)  # one process: fsdp has nothing to shard
    _train(tmp_path / "two", 2, *fsdp)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    reference = _weights(tmp_path / "one", 4)
    _assert_same_weights(reference, _weights(tmp_path / "two", 4))
    assert [r["loss"] for r in _rows(tmp_path / "one")] == pytest.approx(
        [r["loss"] for r in _rows(tmp_path / "two")], rel=1e-5
    )
    # the gathered final model loads like any other
    from qstar.core.model import QuietStar

    one = QuietStar.from_pretrained(tmp_path / "one" / "final")
    two = QuietStar.from_pretrained(tmp_path / "two" / "final")
    _assert_same_weights(one.state_dict(), two.state_dict())

    for name, nproc in (("resumed_two", 2), ("resumed_one", 1)):
        _cut_at(tmp_path / "two", tmp_path / name, 2)
        _train(tmp_path / name, nproc, *fsdp, "--resume")
        _assert_same_weights(reference, _weights(tmp_path / name, 4))
        assert [r["step"] for r in _rows(tmp_path / name)] == [1, 2, 3, 4]


def test_fsdp_quiet_star_step_matches_ddp(tmp_path):
    """One Quiet-STaR step (sampled thoughts, REINFORCE, mixing head) and the held-out evaluation
    with thoughts give the same numbers sharded as replicated."""
    common = ["train.steps=1", "train.batch_size=4", "train.micro_batch_size=2", "eval.every=1"]
    _train(tmp_path / "ddp", 2, *common)
    _train(tmp_path / "fsdp", 2, *common, "train.parallel=fsdp")
    _assert_same_weights(_weights(tmp_path / "ddp", 1), _weights(tmp_path / "fsdp", 1))
    for kind in ("train", "eval"):
        a, b = _rows(tmp_path / "ddp", kind), _rows(tmp_path / "fsdp", kind)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b, strict=True):
            for key, value in ra.items():
                if key.startswith(("eval/", "loss", "base_nll", "mixed_nll", "policy", "reward")):
                    assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "eval/nll_thought" in _rows(tmp_path / "fsdp", "eval")[-1]


def test_fsdp_scores_tasks_on_the_gathered_final_model(tmp_path):
    """No process holds the whole model while sharded, so eval.tasks_at=end scores the tasks on
    final/ after training, thinking and not, with per-example scores, as one process would."""
    from .test_evaluation import _custom_task

    task_dir = _custom_task(tmp_path)
    common = [
        "train.steps=2",
        "eval.every=2",
        "eval.tasks=my_addition",
        "eval.limit=3",
        "eval.tasks_at=end",
        "eval.tasks_both=true",
        f"eval.include_paths=[{task_dir}]",
    ]
    _train(tmp_path / "fsdp", 2, *common, "train.parallel=fsdp")
    _train(tmp_path / "one", 1, *common)
    rows = _rows(tmp_path / "fsdp", "eval")
    scored = [r for r in rows if "eval/my_addition/acc" in r]
    assert [r["step"] for r in scored] == [2]
    assert "eval/my_addition:nothink/acc" in scored[0]
    assert (tmp_path / "fsdp" / "tasks" / "step_2" / "my_addition.jsonl").is_file()
    one = [r for r in _rows(tmp_path / "one", "eval") if "eval/my_addition/acc" in r][0]
    for key in ("eval/my_addition/acc", "eval/my_addition:nothink/acc"):
        assert scored[0][key] == pytest.approx(one[key])


def test_fsdp_refuses_in_training_task_eval():
    from qstar.run_config import load_run_config

    with pytest.raises(ValueError, match="tasks_at=end"):
        load_run_config(None, ["train.parallel=fsdp", "eval.tasks=[gsm8k]"])
    load_run_config(None, ["train.parallel=fsdp", "eval.tasks=[gsm8k]", "eval.tasks_at=end"])
    with pytest.raises(ValueError, match="parallel must be one of"):
        load_run_config(None, ["train.parallel=zero3"])


# ------------------------------------------------------------------ the STaR family
STAR_METHODS = {
    "star": ("train.method=star", "star.iterations=2"),
    "trice": ("train.method=trice", "train.steps=2", "eval.every=2"),
    "vstar": (
        "train.method=vstar",
        "star.iterations=1",
        "vstar.samples=2",
        "vstar.verifier_steps=1",
    ),
}


def _star_cfg(method: str):
    from qstar.run_config import load_run_config, resolve_config

    # each generation batch has its own seed: the rationales do not depend on how many
    # processes share them out
    overrides = ["logging.progress=false", *STAR_METHODS[method]]
    return load_run_config(resolve_config("star_debug_tiny"), overrides)


def _coin(example, text: str) -> bool:
    """Correctness by a hash of the question and the text (a random model is never right)."""
    import zlib

    return zlib.crc32((example.id + text).encode()) % 2 == 0


def _star_worker(rank: int, world: int, port: int, method: str, run_dir: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from qstar.qa import answers
    from qstar.recipes.train import train

    answers.is_correct = _coin
    train(_star_cfg(method), run_dir)


@pytest.mark.parametrize("method", sorted(STAR_METHODS))
def test_star_family_on_two_processes_equals_one(method, tmp_path, monkeypatch):
    """Two gloo processes share each step's sampling and micro-batches (data-parallel
    fine-tuning, TRICE's memory exchanged) and end where one process does."""
    import socket

    import torch.multiprocessing as mp

    from qstar.qa import answers
    from qstar.recipes.train import train

    monkeypatch.setattr(answers, "is_correct", _coin)
    train(_star_cfg(method), tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_star_worker, args=(2, port, method, str(tmp_path / "two")), nprocs=2)
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    _assert_same_weights(one, two)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    ref = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["eval_last"] == pytest.approx(ref["eval_last"])
    moved = [r for r in _rows(tmp_path / "one") if r.get("grad_norm", 0) > 0]
    assert moved  # something was fine-tuned: this test can fail
