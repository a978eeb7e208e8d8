"""The recipe contract and the run layer under it: a new method registered in one place gets a
run directory, checkpoints, resume and a summary; every method honours the shared settings
(trainable parameters, the fused head, MLflow); old checkpoints resume; every trained parameter
is saved."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qstar import QuietStar, QuietStarConfig
from qstar import run_config as run_config_mod
from qstar.core import hf
from qstar.models.random import tiny_model
from qstar.qa import answers
from qstar.recipes import registry
from qstar.recipes.base import Recipe
from qstar.recipes.train import format_summary, train
from qstar.run_config import load_run_config, resolve_config
from qstar.runs import distributed
from qstar.runs.step import optimizer_step


# ------------------------------------------------------------------ a new method, in one place
@dataclass
class CountSection:
    """The test method's own config section."""

    bump: int = 1

    def validate(self) -> None:
        if self.bump < 1:
            raise ValueError(f"bump must be >= 1, got {self.bump}")


class CountRecipe(Recipe):
    """A minimal method: each step fits the plain LM on a fixed random batch and adds
    ``count.bump`` to a counter that lives in the checkpoints."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.counter = 0

    def prepare(self, qs, ctx):
        gen = torch.Generator().manual_seed(self.cfg.train.seed)
        self.ids = torch.randint(5, 200, (2, 12), generator=gen)
        return {"data": "random tokens"}

    def train_step(self, run, step):
        out = run.model(self.ids.to(run.device), think=False)
        loss = -out.base_logprob.mean()
        loss.backward()
        self.counter += self.cfg.count.bump
        row = {"kind": "train", "step": step, **optimizer_step(run, {"loss": loss.item()}, step)}
        run.log({**row, "counter": self.counter})
        return row

    def evaluate(self, run, step):
        return {"kind": "eval", "step": step, "eval/counter": float(self.counter)}

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]

    def summary(self, run):
        return {"steps": self.cfg.train.steps, "counter": self.counter}

    @staticmethod
    def format_summary(summary):
        return f"counted to {summary['counter']}"


@pytest.fixture
def count_method():
    """Register the test method for one test, then remove it and its section again."""
    methods, sections = dict(registry._METHODS), dict(run_config_mod.SECTIONS)
    registry.register(registry.Method("count", CountRecipe, "Count", (("count", CountSection),)))
    yield
    registry._METHODS.clear()
    registry._METHODS.update(methods)
    run_config_mod.SECTIONS.clear()
    run_config_mod.SECTIONS.update(sections)


def _rows(run_dir):
    return [
        {
            k: v
            for k, v in json.loads(line).items()
            if not k.endswith("_s") and k not in ("peak_mem_mb", "tokens_per_s")
        }
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_new_method_registered_in_one_place_gets_the_whole_run_layer(
    tmp_path, tiny_run_config, count_method
):
    cfg = tiny_run_config("train.method=count", "count.bump=2", "train.steps=4", "eval.every=2")
    summary = train(cfg, tmp_path / "a")
    run = tmp_path / "a"
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "final"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["recipe"] == {"counter": 8}
    assert summary["counter"] == 8 and summary["method"] == "count"
    assert format_summary(cfg, summary) == "counted to 8"
    assert json.loads((run / "run.json").read_text())["data"] == "random tokens"
    evals = [r for r in _rows(run) if r["kind"] == "eval"]
    assert [r["eval/counter"] for r in evals] == [0.0, 4.0, 8.0]
    # interrupted after step 2, resumed: the same rows, counter and weights
    assert train(cfg, tmp_path / "b", stop_after=2)["stopped_at"] == 2
    assert train(cfg, tmp_path / "b", resume=True)["counter"] == 8
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    wa = load_file(str(run / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="count.bump"):
        tiny_run_config("train.method=count", "count.bump=0")


def test_an_unknown_method_lists_the_registered_ones(tiny_run_config, tmp_path):
    with pytest.raises(ValueError, match=r"train.method must be one of \['quiet_star', 'star'"):
        train(tiny_run_config("train.method=ppo"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the STaR family and the run layer
def _star_cfg(*overrides):
    return load_run_config(
        resolve_config("star_debug_tiny"), ["logging.progress=false", *overrides]
    )


METHODS = {
    "star": ("train.method=star", "star.iterations=1"),
    "trice": ("train.method=trice", "train.steps=2", "eval.every=2"),
    "vstar": (
        "train.method=vstar",
        "star.iterations=1",
        "vstar.samples=2",
        "vstar.verifier_steps=1",
    ),
}


@pytest.fixture
def coin(monkeypatch):
    """Correctness by a hash of the text: some samples right, some wrong (a random model is
    never right), so every method keeps, accepts and pairs something."""
    import zlib

    monkeypatch.setattr(answers, "is_correct", lambda ex, t: zlib.crc32(t.encode()) % 2 == 0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_star_family_uses_the_one_checkpoint_format(method, tmp_path, coin):
    train(_star_cfg(*METHODS[method]), tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert {p.name for p in latest.iterdir()} >= {
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    }
    assert "recipe" in json.loads((latest / "state.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_star_family_refuses_heads_only_training(method, tmp_path):
    """train.trainable=heads trains what thinking adds; the STaR family's loss uses no thoughts,
    so it would train nothing: refused before any work, where it was silently ignored."""
    with pytest.raises(ValueError, match="train.trainable=heads"):
        train(_star_cfg(*METHODS[method], "train.trainable=heads"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_star_family_honours_fused_ce(tmp_path, coin):
    """train.fused_ce reaches the STaR family's completion scoring: the same run either way."""
    rows = {}
    for mode in ("off", "chunked"):
        train(_star_cfg(*METHODS["trice"], f"train.fused_ce={mode}"), tmp_path / mode)
        saved = json.loads((tmp_path / mode / "final" / "qstar_config.json").read_text())
        assert saved["fused_ce"] == mode
        rows[mode] = [r for r in _rows(tmp_path / mode) if r["kind"] == "train"]
    for a, b in zip(rows["off"], rows["chunked"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


@pytest.fixture
def fake_mlflow(monkeypatch):
    """An mlflow module that records what it is given (mlflow is optional and not installed)."""
    calls: dict[str, list] = {"metrics": [], "runs": []}
    mod = types.ModuleType("mlflow")
    mod.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    mod.set_tracking_uri = lambda uri: None
    mod.set_experiment = lambda name: None
    mod.start_run = lambda run_name=None: calls["runs"].append(run_name)
    mod.log_params = lambda params: None
    mod.log_metrics = lambda metrics, step=None: calls["metrics"].append((step, metrics))
    mod.end_run = lambda: None
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    return calls


@pytest.mark.parametrize("method", sorted(METHODS))
def test_star_family_honours_mlflow(method, tmp_path, coin, fake_mlflow):
    train(_star_cfg(*METHODS[method], "logging.mlflow=true"), tmp_path / "run")
    assert fake_mlflow["runs"] == ["run"]
    logged = {k for _, m in fake_mlflow["metrics"] for k in m}
    assert "eval.qa_acc" in logged and "loss" in logged or "completion_nll" in logged


def test_old_checkpoint_layout_resumes(tmp_path, tiny_run_config):
    """Checkpoints written before recipes owned their state kept the data position at the top of
    state.json: they resume to the same result."""
    cfg = tiny_run_config("train.steps=4", "eval.every=2", "train.checkpoint_every=2")
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", stop_after=2)
    state_file = tmp_path / "b" / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(state_file.read_text())
    old = {k: v for k, v in state.items() if k != "recipe"} | {"data": state["recipe"]["data"]}
    state_file.write_text(json.dumps(old))
    train(cfg, tmp_path / "b", resume=True)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


# ------------------------------------------------------------------ persistence
class WithGate(QuietStar):
    """A model that adds a head of its own (as a later method might)."""

    def __init__(self, base_model, tokenizer, config):
        super().__init__(base_model, tokenizer, config)
        hidden = base_model.get_input_embeddings().weight.shape[1]
        self.gate_head = nn.Linear(hidden, 1)


def test_every_trained_parameter_outside_the_base_model_is_saved(tmp_path):
    model, tok = tiny_model("llama")
    qs = WithGate.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=1))
    with torch.no_grad():
        qs.gate_head.weight.normal_()
        qs.meta_embeddings.normal_()
    qs.save_pretrained(tmp_path / "m")
    heads = load_file(str(tmp_path / "m" / "qstar_heads.safetensors"))
    assert {"gate_head.weight", "gate_head.bias", "meta_embeddings"} <= set(heads)
    loaded = WithGate.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.gate_head.weight, qs.gate_head.weight)
    # a model without the head refuses the file rather than dropping what it cannot hold
    with pytest.raises(ValueError, match="gate_head"):
        QuietStar.from_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "old")
    plain = {k: v for k, v in heads.items() if not k.startswith("gate_head")}
    from safetensors.torch import save_file

    save_file(plain, str(tmp_path / "old" / "qstar_heads.safetensors"))
    with pytest.raises(ValueError, match="gate_head"):  # and a head missing from the file
        WithGate.from_pretrained(tmp_path / "old")
    assert isinstance(QuietStar.from_pretrained(tmp_path / "old"), QuietStar)


def test_the_backbone_is_found_under_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    model, _ = tiny_model("llama")
    plain = hf.backbone(model)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj"], lora_alpha=4)
    )
    assert hf.backbone(wrapped) is plain
    assert type(plain).__name__ == "LlamaModel"


def test_distributed_shard_map_keeps_the_order():
    ctx = distributed.Context()
    assert distributed.shard_map(lambda xs: [x * 2 for x in xs], [1, 2, 3], ctx) == [2, 4, 6]
