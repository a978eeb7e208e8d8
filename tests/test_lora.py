"""train.trainable=lora (PEFT) on tiny models: a fresh adapter is the base model, only the
adapters and what qstar adds train, resume equals an uninterrupted run, final/ is the merged
model (and the adapter alone), and lm-eval scores it like any model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qstar import QuietStar, QuietStarConfig
from qstar.core import hf
from qstar.evaluation.heldout import heldout_nll
from qstar.models.random import tiny_model
from qstar.recipes.train import train
from qstar.runs.trainable import prepare_trainable

from .test_evaluation import _custom_task

pytest.importorskip("peft")
LORA = ["train.trainable=lora", "train.lora_targets=q_proj,v_proj,up_proj"]


def test_a_fresh_adapter_is_the_base_model():
    model, tok = tiny_model("llama")
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=2))
    ids = torch.randint(5, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    before = qs.mixed_logits(ids)
    named = prepare_trainable(qs, "lora", thinks=True, lora=(4, 8.0, "q_proj,v_proj"))
    assert hf.is_peft(qs.base_model)
    torch.testing.assert_close(qs.mixed_logits(ids), before)  # B = 0: nothing changed
    names = [n for n, _ in named]
    assert names and all("lora_" in n or not n.startswith("base_model.") for n in names)
    assert "meta_embeddings" in names and any(n.startswith("mixing_head.") for n in names)
    frozen = [
        p for n, p in qs.named_parameters() if n.startswith("base_model.") and "lora_" not in n
    ]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_lora_run_trains_only_the_adapters_and_resumes(tmp_path, tiny_run_config):
    cfg = tiny_run_config(*LORA, "train.steps=4", "eval.every=2", "train.checkpoint_every=2")
    train(cfg, tmp_path / "a")
    ckpt = load_file(str(tmp_path / "a" / "checkpoints" / "step_000004" / "model.safetensors"))
    assert ckpt and all("lora_" in k or not k.startswith("base_model.") for k in ckpt)
    train(cfg, tmp_path / "b", stop_after=2)
    train(cfg, tmp_path / "b", resume=True)

    def rows(d):
        skip = ("peak_mem_mb", "tokens_per_s")
        return [
            {k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k not in skip}
            for x in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_final_is_the_merged_model_and_loads_anywhere(tmp_path, tiny_run_config):
    cfg = tiny_run_config(*LORA, "train.steps=3", "eval.every=3", "optim.lr=1e-2")
    train(cfg, tmp_path / "run")
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = QuietStar.from_pretrained(final)
    assert not hf.is_peft(merged.base_model)
    # the merged weights differ from the base model's: the adapters learned something
    base = QuietStar.from_pretrained("tiny:llama")
    ids = torch.randint(5, 250, (1, 9), generator=torch.Generator().manual_seed(0))
    assert (merged.base_logits(ids) - base.base_logits(ids)).abs().max() > 1e-4
    # and they are what the trained PEFT model computed (held-out NLL logged at the last step)
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in last if r["kind"] == "eval"][-1]["eval/nll_base"]
    windows = json.loads((tmp_path / "run" / "heldout.json").read_text())["windows"]
    again = heldout_nll(merged, windows, 4, torch.device("cpu"), think=False)["eval/nll_base"]
    assert again == pytest.approx(logged, rel=1e-4)


def test_lm_eval_scores_the_merged_model(tmp_path, tiny_run_config):
    import subprocess
    import sys

    train(tiny_run_config(*LORA, "train.steps=2", "eval.every=2"), tmp_path / "run")
    task_dir = _custom_task(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qstar.cli",
            "eval",
            "--model",
            str(tmp_path / "run"),
            "--tasks",
            "my_addition",
            "--include-path",
            str(task_dir),
            "--limit",
            "3",
            "--output",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-1500:]
    assert "my_addition" in out.stdout


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.trainable=lora", "train.lora_targets=q_projx"], "train.lora_targets"),
        (["train.trainable=lora", "train.parallel=fsdp"], "trainable=lora with parallel=fsdp"),
    ],
)
def test_bad_lora_settings_fail_before_any_work(overrides, match, tmp_path, tiny_run_config):
    with pytest.raises(ValueError, match=match):
        train(tiny_run_config(*overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
