"""Data sources, windows and bad rows."""

import json

import pytest

from qstar.data import DataError, WindowStream, load_documents, tokenize
from qstar.models.random import tiny_tokenizer


def test_jsonl_with_template_and_bad_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"question": "q1", "answer": "a1"})
        + "\n"
        + "{oops\n"
        + json.dumps({"question": "q2"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_documents(str(f), template="{question}\n{answer}")
    docs = load_documents(str(f), template="{question}\n{answer}", on_bad_row="skip")
    assert docs.texts == ["q1\na1"] and docs.skipped == 2
    assert "d.jsonl:3: template field 'answer' is missing" in docs.skipped_examples[1]


def test_json_parquet_txt_and_directory(tmp_path):
    import pandas as pd

    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "b.json").write_text(
        '{"text": "three"}\n{"text": "four"}\n'
    )  # JSON lines named .json
    pd.DataFrame({"text": ["five", "six"]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("seven\nstill seven\n\n\neight\n")
    docs = load_documents(str(tmp_path))
    assert docs.texts == [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven\nstill seven",
        "eight",
    ]


def test_missing_field_empty_and_missing_sources(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="text field 'text' is missing.*data.text_field"):
        load_documents(str(f))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no documents"):
        load_documents(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no built-in text"):
        load_documents("builtin:nope")


def test_hub_ids_use_the_local_layout_when_present(shared_data):
    docs = load_documents(
        "openai/gsm8k",
        "test",
        template="{question}\n{answer}",
        configured_dir=str(shared_data),
        max_documents=5,
    )
    assert len(docs.texts) == 5 and "####" in docs.texts[0]
    assert docs.source.endswith("gsm8k/test.jsonl")


def test_windows_are_deterministic_and_resumable():
    tok = tiny_tokenizer()
    docs = tokenize(tok, load_documents("builtin:sample").texts)
    for mode in ("random", "pack"):
        a = WindowStream(docs, 16, mode, seed=3, pad_id=1, eos_id=0)
        b = WindowStream(docs, 16, mode, seed=3, pad_id=1, eos_id=0)
        batches = [a.next_batch(4) for _ in range(40)]  # crosses an epoch boundary
        b.next_batch(4)
        state = b.state()
        c = WindowStream(docs, 16, mode, seed=3, pad_id=1, eos_id=0)
        c.load_state(state)
        for i in range(1, 40):
            ids, mask = c.next_batch(4)
            assert ids.equal(batches[i][0]) and mask.equal(batches[i][1])
        other = WindowStream(docs, 16, mode, seed=4, pad_id=1, eos_id=0)
        assert not other.next_batch(4)[0].equal(batches[0][0])
    assert batches[0][1].all()  # packed windows are full


def test_sources_resolve_in_one_order_with_the_bundled_sample_last(tmp_path, monkeypatch, capsys):
    """Explicit path, then the data folder, then the hub, then the bundled sample (said once)."""
    from qstar import data

    monkeypatch.delenv("QSTAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    reachable = {"hub": False}
    monkeypatch.setattr("qstar.hub.hub_reachable", lambda *a, **k: reachable["hub"])
    own = tmp_path / "own.jsonl"
    own.write_text('{"question": "q", "answer": "a"}\n')
    assert data.resolve(str(own), "train").origin == "path"
    folder = tmp_path / "data" / "gsm8k"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert data.resolve("openai/gsm8k", "train", str(tmp_path / "data")).origin == "data_dir"
    monkeypatch.setenv("QSTAR_DATA_DIR", str(tmp_path / "data"))
    assert data.resolve("openai/gsm8k", "train").origin == "data_dir"
    monkeypatch.delenv("QSTAR_DATA_DIR")
    reachable["hub"] = True
    assert data.resolve("openai/gsm8k", "train").kind == "hub"
    reachable["hub"] = False
    found = data.resolve("openai/gsm8k", "train")
    assert found.origin == "bundled" and "no QSTAR_DATA_DIR" in found.note
    docs = load_documents("openai/gsm8k", "train", template="{question}\n{answer}")
    assert len(docs.texts) == 300 and docs.origin == "bundled"
    load_documents("openai/gsm8k", "train", template="{question}\n{answer}")
    assert capsys.readouterr().err.count("bundled 300-row GSM8K train sample") == 1
    # nothing to fall back to: one line naming the source and the fix
    with pytest.raises(DataError, match="allenai/c4.*unreachable.*QSTAR_DATA_DIR"):
        data.resolve("allenai/c4", "validation")


def test_bundled_samples_are_small_and_documented():
    from qstar.data import BUILTIN_DIR, BUNDLED

    readme = (BUILTIN_DIR / "README.md").read_text()
    for file, _ in BUNDLED.values():
        path = BUILTIN_DIR / file
        assert path.stat().st_size < 250_000 and file in readme
        assert len(path.read_text().splitlines()) == 300
    assert "MIT" in readme
