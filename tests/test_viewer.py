"""The thought viewer (qstar show) and thinking generation you can watch (qstar generate): the
data, the page as a browser draws it (headless Chromium, where installed: `make chromium`),
escaping, a long text, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from qstar import QuietStar, QuietStarConfig
from qstar.analysis import viewer, viewer_page
from qstar.models.random import tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@pytest.fixture(scope="module")
def qs():
    model, tok = tiny_model("llama")
    q = QuietStar.from_base(model, tok, QuietStarConfig(thought_len=2, n_true=2)).eval()
    torch.nn.init.normal_(q.mixing_head.net[-1].weight, std=0.5)
    return q


def _ids(qs, text="Q: What is 12 times 7? <script>alert(1)</script>\nA: 84"):
    return qs.tokenizer.encode(text, add_special_tokens=False)


def test_the_data_holds_every_position(qs):
    ids = _ids(qs)
    data = viewer.view_data(qs, ids, samples=2)
    assert len(data["tokens"]) == len(ids) and len(data["positions"]) == len(ids) - 1
    p = data["positions"][3]
    assert p["gain"] == pytest.approx(p["nll_base"] - p["nll_thought"], abs=1e-4)
    assert len(p["samples"]) == 2 and len(p["top_base"]) == viewer.TOP
    gains = [x["gain"] for x in data["positions"]]
    assert data["totals"]["helped"] == sum(g > 0 for g in gains)
    # the greedy thought's gain is what held-out scoring measures
    x = torch.tensor([ids])
    want = -qs.next_token_logprobs(x, think=False)[0, 3] + qs.next_token_logprobs(x)[0, 3]
    assert p["gain"] == pytest.approx(float(want), abs=1e-4)


def test_every_token_is_escaped(qs):
    page = viewer_page.render(viewer.view_data(qs, _ids(qs), samples=0))
    body = page.split("<script type='application/json'", 1)[1]
    assert "</script>" not in body.split("</script>", 1)[0]  # the data cannot end its element
    assert page.count("<script") == 2  # the data and the page's own script, nothing else


def _dom(page, anchor=""):
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            f"file://{page}{anchor}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


@needs_browser
def test_the_page_draws_the_tokens_and_a_click_shows_the_thoughts(qs, tmp_path):
    ids = _ids(qs)
    data = viewer.view_data(qs, ids, samples=2)
    page = viewer_page.write_page(data, tmp_path)
    dom = _dom(page)
    assert 'data-ready="1"' in dom  # the script ran to its end
    assert dom.count("data-pos=") == len(ids) - 1  # a span for every predicted token
    assert "&lt;script&gt;" in dom or "&lt;" in dom  # the text's tag is text, not an element
    assert dom.count("<script") == 2
    clicked = _dom(page, "#pos=5")  # what a click on position 5 shows
    assert "Position 5: predicting" in clicked and 'id="thought"' in clicked
    assert data["positions"][5]["samples"][0]["thought"].strip()[:1] in clicked
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,900",
            f"--screenshot={shot}",
            f"file://{page}#pos=5",
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000


@needs_browser
def test_a_long_text_renders_in_seconds(qs, tmp_path):
    """2,000 tokens: the page is drawn in a few seconds (measured in the browser process)."""
    n = 2000
    data = {
        "format": 1,
        "source": "synthetic",
        "model": {},
        "tokens": [f"t{i} " for i in range(n)],
        "positions": [
            {
                "nll_base": 1.0,
                "nll_thought": 1.0 - (i % 7 - 3) / 100,
                "gain": (i % 7 - 3) / 100,
                "gain_pause": 0.0,
                "weight": 0.01,
                "thought": "x y",
                "top_base": [["a", 0.5]] * 5,
                "top_thought": [["a", 0.5]] * 5,
                "samples": [{"thought": "x", "reward": 0.1}],
            }
            for i in range(n - 1)
        ],
        "totals": {"tokens": n - 1, "mean_gain": 0.0, "helped": 0, "hurt": 0},
    }
    page = viewer_page.write_page(data, tmp_path)
    t0 = time.perf_counter()
    dom = _dom(page, "#pos=1500")
    seconds = time.perf_counter() - t0
    assert 'data-ready="1"' in dom and "Position 1500" in dom
    assert seconds < 20, seconds  # measured ~1-2 s here, browser start included


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qstar.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_show_writes_the_page_and_its_json(tmp_path):
    out = _cli("show", "tiny:llama", "--text", "Q: 2 + 2?\nA: 4", "--out", str(tmp_path / "v"))
    assert out.returncode == 0, out.stderr[-1500:]
    data = json.loads((tmp_path / "v" / "thoughts.json").read_text())
    assert data["positions"] and (tmp_path / "v" / "thoughts.html").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "tiny:llama", "--text", "  "], "empty"),
        (["show", "/nonexistent/run", "--heldout", "0"], "heldout.json"),
        (["generate", "tiny:llama", "hi", "--no-think", "--think-threshold", "0.1"], "never think"),
    ],
)
def test_bad_input_is_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1]


def test_a_model_without_its_heads_is_one_line(tmp_path, qs):
    qs.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "qstar_heads.safetensors").unlink()
    out = _cli("show", str(tmp_path / "m"), "--text", "Q: 2 + 2?")
    assert out.returncode == 2 and "qstar_heads.safetensors" in out.stderr.splitlines()[-1]


def test_generate_streams_the_thoughts(qs):
    out = _cli("generate", "tiny:llama", "Q: 2 + 2?\nA:", "--max-tokens", "4", "--show-thoughts")
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.count("| w ") == 4  # a thought before each of the 4 tokens
    plain = _cli("generate", "tiny:llama", "Q: 2 + 2?\nA:", "--max-tokens", "4", "--no-think")
    assert plain.returncode == 0 and "| w " not in plain.stdout


def test_generate_returns_the_thoughts_it_thought(qs):
    ids = torch.tensor([_ids(qs)[:6]])
    tokens, thoughts, weights = qs.generate(ids, max_new_tokens=3, return_thoughts=True)
    assert torch.equal(tokens, qs.generate(ids, max_new_tokens=3))
    assert thoughts.shape == (1, 3, 2) and weights.shape == (1, 3)
    _, none, _ = qs.generate(ids, max_new_tokens=2, think=False, return_thoughts=True)
    assert (none == -1).all()
