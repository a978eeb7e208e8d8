"""Bootstrap intervals and the held-out/task evidence tables, against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qstar.analysis import content, evidence, stats
from qstar.analysis.report import load_experiment


def test_ratio_bootstrap_by_hand():
    # two windows: resampled means are 1 (p=1/4), 2 (1/2) or 3 (1/4)
    est = stats.ratio_bootstrap(np.array([1.0, 3.0]), np.array([1, 1]), n_boot=4000)
    assert est.value == 2.0 and est.n == 2
    assert (est.lo, est.hi) == (1.0, 3.0)
    # token-weighted: window sums 2 (2 tokens) and 6 (3 tokens) -> 8 / 5
    assert stats.ratio_bootstrap(np.array([2.0, 6.0]), np.array([2, 3])).value == pytest.approx(1.6)
    # empty windows are dropped, not counted
    assert stats.ratio_bootstrap(np.array([0.0, 4.0]), np.array([0, 2])).value == 2.0


def test_bootstrap_interval_has_the_normal_width():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=900)
    est = stats.mean_bootstrap(x)
    half = (est.hi - est.lo) / 2
    assert half == pytest.approx(1.96 * x.std() / 30, rel=0.1)
    assert est.lo < est.value < est.hi and est.excludes_zero()
    assert not stats.mean_bootstrap(x - x.mean()).excludes_zero()


def _write_trial(root: Path, trial_id: str, steps: dict[int, dict], cfg: dict, tasks=None):
    run = root / "trials" / trial_id
    (run / "heldout").mkdir(parents=True)
    for step, tokens in steps.items():
        (run / "heldout" / f"step_{step}.json").write_text(json.dumps(tokens))
    (run / "config.yaml").write_text(json.dumps(cfg))
    rows = [{"kind": "eval", "step": s, "eval/nll_base": 0.0} for s in steps]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for (step, task), values in (tasks or {}).items():
        folder = run / "tasks" / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"doc_id": i, "acc": v, "soft_score": v}) for i, v in enumerate(values)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def experiment(tmp_path):
    qs_cfg = {"quiet_star": {"thought_len": 4, "n_true": 2}, "train": {"objective": "quiet_star"}}
    lm_cfg = {"quiet_star": {"thought_len": 4, "n_true": 2}, "train": {"objective": "lm"}}
    base0 = [[1.0, 2.0, 9.0], [3.0, 1.0]]  # step-0 base NLL: 9.0 is the hardest token
    trials = []
    for seed, shift in ((0, 0.1), (1, 0.3)):
        tid = f"t00{seed}-thought_len=4-seed={seed}"
        steps = {
            0: {"base": base0, "thought": base0},
            10: {
                "base": [[1.0, 2.0, 8.0], [3.0, 1.0]],
                "thought": [[1.0 - shift, 2.0, 8.0 - 1.0], [3.0, 1.0 + shift]],
            },
        }
        tasks = {(10, "csqa"): [1, 0, 1, 1], (10, "csqa:nothink"): [0, 0, 1, 1]}
        _write_trial(tmp_path, tid, steps, qs_cfg, tasks)
        trials.append({"trial_id": tid, "overrides": [], "params": {"train.seed": seed}})
    lm_steps = {0: {"base": base0}, 10: {"base": [[1.5, 2.0, 8.5], [3.0, 1.0]]}}
    _write_trial(tmp_path, "t002-objective=lm-seed=0", lm_steps, lm_cfg)
    trials.append({"trial_id": "t002-objective=lm-seed=0", "overrides": [], "params": {}})
    (tmp_path / "trials.json").write_text(json.dumps({"trials": trials}))
    exp = load_experiment(tmp_path)
    dirs = {t["trial_id"]: tmp_path / "trials" / t["trial_id"] for t in trials}
    return evidence.arms_of(exp, dirs)


def test_arms_pool_seeds_and_gains_match_hand_computation(experiment):
    arm, baseline = experiment
    assert arm.seeds == 2 and baseline.baseline and arm.steps() == [0, 10]
    g = evidence.gain(arm, 10)
    # seed 0: diffs (0.1 + 1.0 - 0.1) / 5 tokens = 0.2; seed 1: (0.3 + 1.0 - 0.3) / 5 = 0.2
    assert g.seeds == pytest.approx([0.2, 0.2]) and g.est.value == pytest.approx(0.2)
    hard = evidence.gain(arm, 10, hard=True)  # only the 9.0 token: gain 1.0 in both seeds
    assert hard.est.value == pytest.approx(1.0) and hard.seeds == pytest.approx([1.0, 1.0])
    assert evidence.gain(arm, 0).est.value == 0.0
    # drift: base at step 10 - step 0 = (-1.0) / 5 tokens
    assert evidence.drift(arm, 10).est.value == pytest.approx(-0.2)
    # vs baseline: baseline base - thought, seed 0 paired with the one baseline seed
    vb = evidence.vs_baseline(arm, baseline, 10)
    assert vb.seeds == pytest.approx([(0.6 + 0 + 1.5 + 0 - 0.1) / 5])
    table = evidence.heldout_table(experiment)
    assert list(table["arm"]) == ["4 thought tokens, n_true 2", "no thought (baseline)"]
    assert table.iloc[1]["gain"] is None


def test_compute_matched_baseline_is_compared_at_its_own_last_step(experiment, tmp_path):
    arm, token = experiment
    exp_dir = next(iter(arm.trials.values())).parent.parent
    lm_cfg = {"quiet_star": {"thought_len": 4}, "train": {"objective": "lm", "steps": 30}}
    longer = {0: {"base": [[1.0, 2.0, 9.0], [3.0, 1.0]]}, 10: {"base": [[9.0] * 3, [9.0] * 2]}}
    longer[30] = {"base": [[1.0, 2.0, 7.0], [3.0, 1.0]]}
    _write_trial(exp_dir, "t003-objective=lm-steps=30-seed=0", longer, lm_cfg)
    spec = json.loads((exp_dir / "trials.json").read_text())
    spec["trials"].append(
        {"trial_id": "t003-objective=lm-steps=30-seed=0", "overrides": [], "params": {}}
    )
    (exp_dir / "trials.json").write_text(json.dumps(spec))
    dirs = {t["trial_id"]: exp_dir / "trials" / t["trial_id"] for t in spec["trials"]}
    arms = evidence.arms_of(load_experiment(exp_dir), dirs)
    tok, compute = evidence.baselines(arms)
    assert tok.name == token.name and [c.steps()[-1] for c in compute] == [30]
    table = evidence.heldout_table(arms).set_index("arm")
    thinking = table.loc["4 thought tokens, n_true 2"]
    # token-matched: unchanged (the 10-step baseline, not the longer run's step 10)
    assert thinking["vs baseline"].seeds == pytest.approx([(0.6 + 0 + 1.5 + 0 - 0.1) / 5])
    # compute-matched: its step 30 (1, 2, 7, 3, 1) minus seed 0's thought at step 10
    # (0.9, 2, 7, 3, 1.1): (0.1 + 0 + 0 + 0 - 0.1) / 5 = 0
    assert thinking["vs compute-matched"].seeds == pytest.approx([0.0])
    assert all(v is None for v in table["vs compute-matched"][table.index.str.startswith("no")])


def test_task_table_pairs_thinking_with_not(experiment):
    table = evidence.task_table(experiment, metrics=("acc",))
    row = table.iloc[0]
    assert row["task"] == "csqa" and row["questions"] == 4
    assert row["thinking"].value == pytest.approx(0.75)
    assert row["not thinking"].value == pytest.approx(0.5)
    assert row["thinking - not"].value == pytest.approx(0.25)


def test_report_has_the_evidence_section_and_reading(experiment, tmp_path):
    from qstar.analysis.report import write_report

    exp_dir = next(iter(experiment[0].trials.values())).parent.parent
    reading = tmp_path / "reading.md"
    reading.write_text("Thinking helps a little here.\n")
    report = write_report(exp_dir, tmp_path / "out", analyse_model=False, reading=reading)
    text = report.read_text()
    assert "## Reading\n\nThinking helps a little here." in text
    assert "## Does it learn?" in text and "### Tasks (paper protocol, zero-shot)" in text
    assert "thinking helps" in text  # the seeds' common gain of 0.2 excludes zero
    assert (tmp_path / "out" / "figures" / "heldout_vs_step.png").is_file()
    assert (tmp_path / "out" / "curves.csv").is_file()
    again = write_report(exp_dir, tmp_path / "out2", analyse_model=False, reading=reading)
    assert again.read_text() == text  # deterministic


def test_content_control_scores_a_pause_thought_and_caches(tmp_path, tiny_run_config):
    from qstar.recipes.train import train

    run = tmp_path / "run"
    train(tiny_run_config("train.steps=3", "eval.every=3"), run)
    first = content.content_control(run)
    assert set(first) == {"base", "thought", "fixed"} and len(first["base"]) == 4
    flat = {k: np.concatenate(v) for k, v in first.items()}
    logged = json.loads((run / "heldout" / "step_3.json").read_text())
    assert flat["base"].mean() == pytest.approx(np.concatenate(logged["base"]).mean(), rel=1e-5)
    assert not np.allclose(flat["thought"], flat["fixed"])  # content and pause differ
    assert (run / "analysis" / "content_control.json").is_file()
    again = content.content_control(run)
    assert all(np.allclose(a, b) for a, b in zip(first["fixed"], again["fixed"], strict=True))


def test_failed_trials_lead_the_report_and_are_not_evidence(experiment, tmp_path):
    """A trial that ended in error is named at the top with its cause and gives no finding;
    when every trial failed, the report says nothing in it is evidence."""
    from qstar.analysis.report import write_report

    exp_dir = next(iter(experiment[0].trials.values())).parent.parent
    seed1 = exp_dir / "trials" / "t001-thought_len=4-seed=1"
    (seed1 / "error.txt").write_text(
        "Traceback (most recent call last):\n  ...\n"
        "qstar.errors.TrainingDiverged: training diverged at step 7: non-finite policy term (nan)\n"
    )
    text = write_report(exp_dir, tmp_path / "out", analyse_model=False).read_text()
    assert text.index("## Failed trials") < text.index("## Results")
    assert "**1 of 3 trials ended in error.**" in text
    assert "training diverged at step 7: non-finite policy term (nan)" in text
    held = text[text.index("### Held-out text at the last step") :]
    first_row = next(line for line in held.splitlines() if line.startswith("| 4 thought"))
    assert first_row.split("|")[2].strip() == "1"  # one seed left in the arm
    for trial in ("t000-thought_len=4-seed=0", "t002-objective=lm-seed=0"):
        (exp_dir / "trials" / trial / "error.txt").write_text("RuntimeError: boom\n")
    text = write_report(exp_dir, tmp_path / "out2", analyse_model=False).read_text()
    assert "**No trial finished: all 3 ended in error.**" in text
    assert "## Does it learn?" not in text


def test_seed_only_trials_form_one_arm_and_pair_with_the_baseline_of_their_seed():
    from qstar.analysis.evidence_arms import Arm, Tokens, arm_of

    # a paired sweep whose arm is the base config: only the seed varies
    assert arm_of("t001-seed=0") == arm_of("t004-seed=1") == "base"
    assert arm_of("t003-policy_weight=1.0e2-seed=1") == "policy_weight=1.0e2"
    assert arm_of("my-run") == "my-run"

    def arm(ids_values, baseline):
        tokens = {}
        for tid, v in ids_values:
            base = [np.array([v, v])]
            tokens[tid] = {5: Tokens(base, None if baseline else [np.array([1.0, 1.0])])}
        return Arm("a", "a", baseline, 4, {t: Path(t) for t in tokens}, tokens, {})

    # baseline ids sort seed 1 first: pairing must follow the seed, not the order
    think = arm([("t001-seed=0", 0.0), ("t004-seed=1", 0.0)], baseline=False)
    base = arm([("t000-objective=lm-seed=1", 3.0), ("t003-objective=lm-seed=0", 2.0)], True)
    vb = evidence.vs_baseline(think, base, 5)
    assert vb.seeds == pytest.approx([1.0, 2.0])  # seed 0: 2 - 1, seed 1: 3 - 1


def test_arms_at_a_fraction_are_compared_with_the_all_positions_arm_of_their_settings(tmp_path):
    """The compute section's `all positions - this` and `random - this`: the all-positions arm
    and the random control with the same other settings, their NLL with thinking minus this
    arm's, paired by seed (hand-computed); an arm whose other settings differ has none."""
    from qstar.analysis.report_compute import compute_table

    def cfg(seed, **qs):
        return {"quiet_star": {"thought_len": 4, "n_true": 2, **qs},
                "train": {"objective": "quiet_star", "seed": seed}}  # fmt: skip

    base = [[1.0, 2.0, 3.0]]
    quarter = {"think_fraction": 0.25}
    arms = {
        "all": ({}, [[0.5, 2.0, 3.0]]),
        "hardest": ({"think_at": "hardest", **quarter}, [[1.0, 2.0, 2.0]]),
        "random": ({"think_at": "random", **quarter}, [[1.0, 2.0, 2.8]]),
        "random8": ({"think_at": "random", **quarter, "thought_len": 8}, [[1.0, 1.0, 3.0]]),
    }
    trials = []
    for i, (name, (qs, thought)) in enumerate(arms.items()):
        tid = f"t00{i}-arm={name}-seed=0"
        _write_trial(tmp_path, tid, {10: {"base": base, "thought": thought}}, cfg(0, **qs))
        trials.append({"trial_id": tid, "overrides": [], "params": {"arm": name}})
    (tmp_path / "trials.json").write_text(json.dumps({"trials": trials}))
    exp = load_experiment(tmp_path)
    arm_list = evidence.arms_of(exp, {t: d for t, d, _ in exp.trial_dirs})
    table = compute_table(exp, arm_list)
    table.index = [label.rsplit("arm ", 1)[1] for label in table["arm"]]
    # all: 5.5 / 3 tokens; hardest: 5.0 / 3; random: 5.8 / 3
    assert table.loc["hardest", "all positions - this"].est.value == pytest.approx(0.5 / 3)
    assert table.loc["hardest", "random - this"].est.value == pytest.approx(0.8 / 3)
    assert table.loc["random", "all positions - this"].est.value == pytest.approx(-0.3 / 3)
    assert table.loc["random", "random - this"] is None  # a control has no control
    assert table.loc["all", "all positions - this"] is None
    assert table.loc["random8", "all positions - this"] is None  # no all-positions arm at t=8
    quarter_cost = 0.25 * table.loc["all", "thought compute"]
    assert table.loc["hardest", "thought compute"] == pytest.approx(quarter_cost)


def test_the_gate_at_inference_table_reads_the_cached_gated_nll(tmp_path):
    """A gated arm's final model thinking everywhere against only where its gate says
    (hand-computed from the cached content control), and the threshold at its fraction."""
    from qstar.analysis.report_compute import _gate_section

    cfg = {"quiet_star": {"thought_len": 4, "n_true": 2, "gate": True, "think_at": "gate",
                          "think_fraction": 0.5}, "train": {"objective": "quiet_star", "seed": 0}}  # fmt: skip
    tid = "t000-gate=True-seed=0"
    _write_trial(tmp_path, tid, {10: {"base": [[1.0, 1.0]], "thought": [[1.0, 1.0]]}}, cfg)
    cache = tmp_path / "trials" / tid / "analysis" / "content_control.json"
    cache.parent.mkdir()
    tokens = {"base": [[2.0, 2.0, 2.0, 2.0]], "thought": [[1.0, 3.0, 2.0, 2.0]],
              "fixed": [[2.0, 2.0, 2.0, 2.0]], "gated": [[1.0, 2.0, 2.0, 2.0]],
              "gate": [[0.4, 0.1, 0.2, 0.3]]}  # fmt: skip
    cache.write_text(json.dumps({"key": None, "tokens": tokens}))
    (tmp_path / "trials.json").write_text(json.dumps({"trials": [{"trial_id": tid, "params": {}}]}))
    exp = load_experiment(tmp_path)
    lines = _gate_section(exp, evidence.arms_of(exp, {t: d for t, d, _ in exp.trial_dirs}))
    row = next(line for line in "\n".join(lines).splitlines() if line.startswith("| 4 thought"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "the gate's top 0.5" and float(cells[2]) == pytest.approx(0.25)
    assert cells[4].startswith("2.0000") and cells[5].startswith("1.7500")  # everywhere, gated
    assert cells[6].startswith("+0.2500")  # everywhere - gated: (8 - 7) / 4 tokens
