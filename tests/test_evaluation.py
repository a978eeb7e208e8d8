"""The lm-eval backend, the paper-protocol metrics, task lookup and the eval CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.evaluation.backend import QStarLM, evaluate
from qstar.evaluation.lookup import TaskError, check_task_file, resolve_tasks
from qstar.evaluation.tasks import qstar_task_utils as tu
from qstar.models.random import tiny_model


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_model("llama")
    qs = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=1))
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.5)  # thoughts change predictions
    return QStarLM(model=qs, batch_size=3, max_gen_toks=6)


def text_logprobs(qs, logits):
    """What the backend scores with: log-probabilities without the meta tokens."""
    from qstar.core.think import mask_meta_logits

    return torch.log_softmax(mask_meta_logits(logits.float(), (qs.start_id, qs.end_id)), -1)


class Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_matches_mixed_logits_and_prefix_sharing(lm):
    reqs = [
        Req("Q: What is 12 times 7?\nA:", " 84"),
        Req("Q: What is 12 times 7?\nA:", " 8"),
        Req("The quick brown", " fox jumps"),
    ]
    got = lm.loglikelihood(reqs)
    for req, (ll, greedy) in zip(reqs, got, strict=True):
        ctx, cont = lm._encode_pair(*req.args)
        ids = torch.tensor([ctx + cont])
        lp = text_logprobs(lm.qs, lm.qs.mixed_logits(ids)[0])
        ref = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == all(int(lp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    lm.think = False
    try:
        base = lm.loglikelihood(reqs)  # rows of different lengths in one padded batch
        for req, (ll, greedy) in zip(reqs, base, strict=True):
            ctx, cont = lm._encode_pair(*req.args)
            with torch.no_grad():
                logits = lm.qs.base_model(input_ids=torch.tensor([ctx + cont])).logits[0]
            lp = text_logprobs(lm.qs, logits)
            assert ll == pytest.approx(
                sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), abs=1e-4
            )
            assert greedy == all(
                int(lp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont)
            )
        assert base[0][0] != pytest.approx(got[0][0], abs=1e-4)  # thinking changes the score
    finally:
        lm.think = True


def test_generate_until_stops_and_equals_greedy_mixed_decoding(lm):
    out = lm.generate_until([Req("The quick brown", {"until": ["zzz"], "max_gen_toks": 3})])[0]
    ids = lm.qs.tokenizer("The quick brown", return_tensors="pt").input_ids
    expect = []
    for _ in range(3):
        nxt = int(lm.qs.mixed_logits(ids)[0, -1].argmax())
        expect.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert out == lm.qs.tokenizer.decode(expect)
    stop_at = out[1:3] if len(out) > 2 else out
    cut = lm.generate_until([Req("The quick brown", {"until": [stop_at], "max_gen_toks": 3})])[0]
    assert stop_at not in cut


def test_rolling_loglikelihood_is_the_sum_over_tokens(lm):
    text = "Language models can teach themselves to think."
    got = lm.loglikelihood_rolling([Req(text)])[0]
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    lp = text_logprobs(lm.qs, lm.qs.mixed_logits(torch.tensor([ids[:-1]]))[0])
    assert got == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(ids[1:])), abs=1e-3)


def test_paper_soft_score_by_hand():
    doc = {"question": "1+1?", "answer": "so #### 12"}
    assert tu.gsm8k_answer(doc) == "12\n"
    choices = tu.gsm8k_choices(doc)
    assert (
        len(choices) == 33
        and choices[1] == "1"
        and choices[11 + 2] == "12"
        and choices[22 + 10] == "12\n"
    )
    lls = [math.log(0.01)] * 33
    lls[1], lls[11 + 2], lls[22 + 10] = math.log(0.5), math.log(0.2), math.log(0.9)  # gold chars
    results = [(x, i == 32) for i, x in enumerate(lls)]
    got = tu.score("12\n", tu.DIGITS, results)
    p = [0.5 / (0.5 + 10 * 0.01), 0.2 / (0.2 + 10 * 0.01), 0.9 / (0.9 + 10 * 0.01)]
    assert got["soft_score"] == pytest.approx(p[0] * p[1] * p[2])
    assert got["acc"] == 1 and got["exact_match"] == 1
    lls[11 + 3] = math.log(0.3)  # a wrong digit beats the gold "2"
    assert tu.score("12\n", tu.DIGITS, [(x, False) for x in lls])["acc"] == 0


def test_csqa_prompt_follows_the_paper():
    doc = {
        "question": "Where is a plate kept?",
        "answerKey": "B",
        "choices": {"label": list("ABCDE"), "text": ["car", "cupboard", "sky", "sea", "shoe"]},
    }
    assert (
        tu.csqa_prompt(doc)
        == "Q: Where is a plate kept?\n(A) car\n(B) cupboard\n(C) sky\n(D) sea\n(E) shoe\nA: "
    )
    assert tu.csqa_choices(doc)[:6] == ["A", "B", "C", "D", "E", "\n"] and tu.csqa_target(doc) == 11


def test_unknown_task_lists_close_matches_and_paths(tmp_path):
    with pytest.raises(
        TaskError, match=r"close matches: .*qstar_gsm8k_paper.*include paths searched: .*tasks"
    ):
        resolve_tasks(["qstar_gsm8k_papr"])
    with pytest.raises(TaskError, match="not a directory"):
        resolve_tasks(["gsm8k"], [str(tmp_path / "missing")])


def test_task_yaml_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: my_bad\ndataset_path: json\ndoc_to_txt: x\n")
    with pytest.raises(
        TaskError,
        match=r"bad\.yaml: unknown task key 'doc_to_txt' \(did you mean 'doc_to_text'\?\)",
    ):
        check_task_file(bad)
    with pytest.raises(TaskError, match="bad.yaml: unknown task key"):
        resolve_tasks(["my_bad"], [str(tmp_path)])


def test_local_task_without_data_names_the_option(lm, tmp_path, monkeypatch):
    monkeypatch.delenv("QSTAR_DATA_DIR", raising=False)
    with pytest.raises(TaskError, match=r"gsm8k/test.jsonl is missing: set --data-dir"):
        evaluate(lm, ["qstar_gsm8k_paper_local"], limit=1, data_dir=str(tmp_path))


def _custom_task(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"q": f"{a} plus {a}?", "choices": [str(2 * a), str(a)], "label": 0})
            for a in range(1, 6)
        )
        + "\n"
    )
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "my_addition.yaml").write_text(
        "task: my_addition\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return task_dir


def test_custom_task_by_include_path_through_the_cli(tmp_path):
    task_dir = _custom_task(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qstar.cli",
            "eval",
            "--model",
            "tiny:llama",
            "--tasks",
            "my_addition",
            "--include-path",
            str(task_dir),
            "--limit",
            "3",
            "--both",
            "--output",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-1500:]
    assert "my_addition" in out.stdout and "delta" in out.stdout
    (result,) = (tmp_path / "res").glob("results_*.json")
    payload = json.loads(result.read_text())
    assert set(payload["runs"]) == {"think", "no-think"}
    assert payload["runs"]["think"]["n-samples"]["my_addition"]["effective"] == 3
    prov = payload["provenance"]
    assert (
        prov["task_versions"]["my_addition"] == 1.0 and "quiet_star" in prov and "git_sha" in prov
    )


def test_eval_cli_bad_task_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qstar.cli", "eval", "--model", "tiny:llama", "--tasks", "gsm8kk"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown task 'gsm8kk'" in out.stderr and "gsm8k" in out.stderr
    assert "Traceback" not in out.stderr


def test_paper_and_stock_local_tasks_run(lm, shared_data):
    results = evaluate(
        lm,
        [
            "qstar_gsm8k_paper_local",
            "qstar_csqa_paper_local",
            "commonsense_qa_local",
            "gsm8k_local",
        ],
        limit=2,
        data_dir=str(shared_data),
    )
    table = results["results"]
    assert 0.0 <= table["qstar_gsm8k_paper_local"]["soft_score,none"] <= 1.0
    assert 0.0 <= table["qstar_csqa_paper_local"]["acc,none"] <= 1.0
    assert "acc,none" in table["commonsense_qa_local"]
    assert "exact_match,strict-match" in table["gsm8k_local"]
    assert results["n-samples"]["gsm8k_local"]["effective"] == 2


def test_training_hook_logs_task_metrics(tmp_path, tiny_run_config):
    from qstar.recipes.train import train
    from qstar.runs.tracking import read_metrics

    task_dir = _custom_task(tmp_path)
    cfg = tiny_run_config(
        "train.steps=2",
        "eval.every=2",
        "eval.tasks=my_addition",
        "eval.limit=2",
        f"eval.include_paths=[{task_dir}]",
    )
    train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in rows] == [0, 2]
    assert 0.0 <= rows[-1]["eval/my_addition/acc"] <= 1.0


@pytest.mark.parametrize("bos", [True, False])
def test_no_think_scores_as_lm_evals_hf_model(tmp_path, bos):
    """`--no-think` is lm-eval's own `hf` model on the same weights, on every output type:
    rolling log-likelihood (conditioned on BOS where the tokenizer has one, else EOS),
    log-likelihood with and without context, and greedy generation."""
    import copy

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_model("llama")
    if bos:
        tok.bos_token = tok.convert_ids_to_tokens(2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=2)
    qs = QuietStar.from_base(
        copy.deepcopy(model), copy.deepcopy(tok), QuietStarConfig(thought_len=2)
    )
    ours = QStarLM(model=qs, think=False, batch_size=2)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    texts = ["The quick brown fox jumps over the lazy dog.", "Language models can teach."]
    pairs = [("Q: 2+2?", " A: 4"), ("", "hello there"), ("Q: 2+2?", " A: 5")]
    gen = [("The quick", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})]
    assert ours.prefix_token_id == hf.prefix_token_id == (2 if bos else tok.eos_token_id)
    for a, b in zip(
        hf.loglikelihood_rolling([req("loglikelihood_rolling", (t,)) for t in texts]),
        ours.loglikelihood_rolling([req("loglikelihood_rolling", (t,)) for t in texts]),
        strict=True,
    ):
        assert a == pytest.approx(b, abs=1e-4)
    for (a, ga), (b, gb) in zip(
        hf.loglikelihood([req("loglikelihood", p) for p in pairs]),
        ours.loglikelihood([req("loglikelihood", p) for p in pairs]),
        strict=True,
    ):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert hf.generate_until([req("generate_until", g) for g in gen]) == ours.generate_until(
        [req("generate_until", g) for g in gen]
    )


def test_sampled_copies_share_one_prefill_and_equal_separate_prompts(lm):
    """`copies`: continuations of one prefill equal the same prompts repeated in the batch
    (sampled answers and thoughts, the same draws), for left-padded prompts of two lengths."""
    qs = lm.qs
    a, b = lm.tok_encode("Q: What is 12 times 7?\nA:"), lm.tok_encode("The quick")
    rows = [a, a, b]  # prompt a twice, b once
    width = len(a)
    ids = torch.full((3, width), qs.fill_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    kw = dict(max_new_tokens=5, do_sample=True, greedy_thoughts=False)
    separate = qs.generate(ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    shared = qs.generate(
        ids[1:],
        mask[1:],
        generator=torch.Generator().manual_seed(0),
        copies=torch.tensor([2, 1]),
        **kw,
    )
    assert torch.equal(separate, shared)
    assert not torch.equal(separate[0], separate[1])  # the copies are sampled independently


@pytest.mark.parametrize(
    "text, number",
    [
        ("She has 3 + 4 = 7 apples. The answer is 7.", "7"),
        ("So 1,234 + 1 = 1,235.\n#### 1,235", "1235"),
        ("The answer is $18.00", "18"),
        ("It costs $0.50 each, so 4 x 0.5 = 2. The final answer is: 2", "2"),
        ("The answer is 12. But wait, 3 more makes 15", "12"),  # the stated answer wins
        ("He lost 5 and ends with -3", "-3"),  # no statement: the last number
        ("no number here", None),
    ],
)
def test_cot_answer_extraction(text, number):
    assert tu.extract_number(text) == number


def test_cot_majority_vote_and_pass_at_1_by_hand():
    doc = {"question": "q", "answer": "... #### 1,200"}
    samples = ["The answer is 1200.", "#### 7", "The answer is 7", "so 1,200", "nothing"]
    out = tu.gsm8k_cot_process_results(doc, [samples])
    # answers: 1200, 7, 7, 1200, None: a tie, the earliest (1200) wins; 2 of 5 right
    assert out == {"maj@5": 1.0, "pass@1": 0.4}
    assert tu.majority([None, "3", "4", "4"]) == "4" and tu.majority([None]) is None


def test_cot_majority_task_runs_with_8_samples_a_question(lm, tmp_path):
    rows = [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"},
        {"question": "What is 3 x 3?", "answer": "#### 9"},
    ]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    results = evaluate(lm, ["qstar_gsm8k_cot_maj8_local"], limit=2, data_dir=str(tmp_path))
    table = results["results"]["qstar_gsm8k_cot_maj8_local"]
    assert 0.0 <= table["maj@8,samples"] <= 1.0 and 0.0 <= table["pass@1,samples"] <= 1.0
    assert results["n-samples"]["qstar_gsm8k_cot_maj8_local"]["effective"] == 2  # questions


def test_thinking_generation_is_the_same_alone_and_left_padded_in_a_batch(lm):
    """Padding invariance of KV-cached thinking generation (greedy thoughts and tokens): a row
    generates the same tokens alone as left-padded beside a longer prompt."""
    qs = lm.qs
    a, b = lm.tok_encode("Q: What is 12 times 7?\nA:"), lm.tok_encode("The quick")
    ids = torch.full((2, len(a)), qs.fill_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate([a, b]):
        ids[i, len(a) - len(r) :], mask[i, len(a) - len(r) :] = torch.tensor(r), 1
    batch = qs.generate(ids, mask, max_new_tokens=6)
    for i, r in enumerate([a, b]):
        assert torch.equal(batch[i], qs.generate(torch.tensor([r]), max_new_tokens=6)[0])


def test_csqa_cot_majority_vote_by_hand():
    doc = {
        "question": "q",
        "choices": {"label": list("ABCDE"), "text": list("vwxyz")},
        "answerKey": "C",
    }
    assert tu.csqa_cot_prompt(doc).endswith("(E) z\nA: Let's think step by step.")
    samples = [
        "so the answer is (C).",
        "The answer is B",
        "(B) seems right",
        "The answer is c.",
        "hm",
    ]
    # letters: C, B, B, C, None: a tie, the earliest (C) wins; 2 of 5 right
    assert tu.csqa_cot_process_results(doc, [samples]) == {"maj@5": 1.0, "pass@1": 0.4}


def test_csqa_cot_task_runs_from_local_files(lm, tmp_path):
    def row(i, key):
        choices = [{"label": c, "text": f"option {c}"} for c in "ABCDE"]
        return {
            "id": str(i),
            "question": {"stem": f"Question {i}?", "choices": choices},
            "answerKey": key,
        }

    (tmp_path / "csqa").mkdir()
    (tmp_path / "csqa" / "dev_rand_split.jsonl").write_text(
        "\n".join(json.dumps(row(i, k)) for i, k in enumerate("ABC"))
    )
    results = evaluate(lm, ["qstar_csqa_cot_maj8_local"], limit=1, data_dir=str(tmp_path))
    table = results["results"]["qstar_csqa_cot_maj8_local"]
    assert 0.0 <= table["maj@8,samples"] <= 1.0 and 0.0 <= table["pass@1,samples"] <= 1.0
    assert results["n-samples"]["qstar_csqa_cot_maj8_local"]["effective"] == 1
