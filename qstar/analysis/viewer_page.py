"""The thought viewer as one self-contained HTML page (no server, no network): the data of
:mod:`qstar.analysis.viewer` embedded as JSON and drawn by a small script. Every token is put in
the page with ``textContent`` (never as HTML), so a text holding ``<script>`` shows as text.

What the page shows: the text, each token coloured by the gain of thinking before it (blue:
thinking lowered the loss of that token, red: it raised it), a legend and the totals; a click (or
``#pos=N`` in the address) opens that position's greedy thought, its sampled thoughts with their
rewards, the mixing weight, the top predictions with and without the thought, and the content
control (the gain of a pause thought); a strip of positions sorted by gain, with a filter for
the hardest tokens (the highest loss without a thought)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STYLE = """
body{font:14px/1.5 system-ui,sans-serif;margin:1.5em;max-width:1100px;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} .muted{color:#666}
#text{white-space:pre-wrap;border:1px solid #ddd;padding:.8em;border-radius:6px;line-height:1.9}
#text span{cursor:pointer;border-radius:3px;padding:1px 0}
#text span.sel{outline:2px solid #000}
#legend span{display:inline-block;width:4em;text-align:center;font-size:11px}
#detail{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;margin:1em 0;min-height:3em}
table{border-collapse:collapse;margin:.3em 0} td,th{padding:1px 8px;border-bottom:1px solid #eee}
th{text-align:left;font-weight:600} code{background:#f4f4f4;padding:0 3px;border-radius:3px}
#strip{display:flex;flex-wrap:wrap;gap:2px;margin-top:.5em}
#strip span{font-size:11px;padding:0 3px;border-radius:3px;cursor:pointer}
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('qstar-data').textContent);
const maxAbs = Math.max(1e-9, ...D.positions.map(p => Math.abs(p.gain)));
function colour(g) {
  const a = Math.min(1, Math.abs(g) / maxAbs);
  return g >= 0 ? `rgba(40,110,220,${0.08 + 0.72 * a})` : `rgba(220,50,40,${0.08 + 0.72 * a})`;
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function shown(tok) { return tok.replace(/\n/g, '\u21b5\n'); }
const text = document.getElementById('text');
const spans = [];
D.tokens.forEach((tok, i) => {
  const s = el('span', shown(tok));
  if (i > 0) {  // token i is predicted at position i - 1
    const p = D.positions[i - 1];
    s.style.background = colour(p.gain);
    s.title = `gain ${p.gain.toFixed(4)} nats`;
    s.dataset.pos = i - 1;
    s.addEventListener('click', () => select(i - 1));
  }
  spans.push(s);
  text.appendChild(s);
});
function table(rows, head) {
  const t = el('table');
  const h = el('tr');
  head.forEach(c => h.appendChild(el('th', c)));
  t.appendChild(h);
  rows.forEach(r => { const tr = el('tr'); r.forEach(c => tr.appendChild(el('td', String(c)))); t.appendChild(tr); });
  return t;
}
function select(i) {
  spans.forEach(s => s.classList.remove('sel'));
  spans[i + 1].classList.add('sel');
  const p = D.positions[i];
  const d = document.getElementById('detail');
  d.replaceChildren();
  d.className = '';
  d.appendChild(el('h3', `Position ${i}: predicting ${JSON.stringify(D.tokens[i + 1])}`));
  d.appendChild(el('div', `NLL without thinking ${p.nll_base.toFixed(4)}, with its thought ` +
    `${p.nll_thought.toFixed(4)}: gain ${p.gain.toFixed(4)} nats; mixing weight ${p.weight.toFixed(4)}`));
  const th = el('div', 'greedy thought: ');
  th.appendChild(el('code', p.thought));
  th.id = 'thought';
  d.appendChild(th);
  d.appendChild(el('div', `content control: a pause thought gains ${p.gain_pause.toFixed(4)} nats ` +
    `(its own thought ${(p.gain - p.gain_pause >= 0 ? '+' : '') + (p.gain - p.gain_pause).toFixed(4)} beyond it)`, 'muted'));
  if (p.samples) {
    d.appendChild(el('div', 'sampled thoughts (reward: log-likelihood gain of the next tokens):'));
    d.appendChild(table(p.samples.map(s => [s.thought, s.reward.toFixed(4)]), ['thought', 'reward']));
  }
  const tops = p.top_base.map((b, j) => [b[0], b[1].toFixed(3), p.top_thought[j][0], p.top_thought[j][1].toFixed(3)]);
  d.appendChild(table(tops, ['without thought', 'p', 'with thought', 'p']));
  history.replaceState(null, '', '#pos=' + i);
}
const strip = document.getElementById('strip');
function drawStrip() {
  const hard = document.getElementById('hard').checked;
  let idx = D.positions.map((p, i) => i);
  if (hard) {
    const cut = [...D.positions].map(p => p.nll_base).sort((a, b) => b - a)[Math.floor(D.positions.length / 10)];
    idx = idx.filter(i => D.positions[i].nll_base >= cut);
  }
  idx.sort((a, b) => D.positions[b].gain - D.positions[a].gain);
  strip.replaceChildren();
  idx.forEach(i => {
    const s = el('span', shown(D.tokens[i + 1]));
    s.style.background = colour(D.positions[i].gain);
    s.title = `position ${i}, gain ${D.positions[i].gain.toFixed(4)}`;
    s.addEventListener('click', () => select(i));
    strip.appendChild(s);
  });
}
document.getElementById('hard').addEventListener('change', drawStrip);
drawStrip();
const T = D.totals;
document.getElementById('totals').textContent =
  `${T.tokens} positions; mean gain ${T.mean_gain.toFixed(4)} nats/token; thinking helped ` +
  `${T.helped}, hurt ${T.hurt}.`;
const legend = document.getElementById('legend');
[-1, -0.5, 0, 0.5, 1].forEach(f => { const s = el('span', (f * maxAbs).toFixed(3)); s.style.background = colour(f * maxAbs); legend.appendChild(s); });
const m = location.hash.match(/pos=(\d+)/);
if (m && +m[1] < D.positions.length) select(+m[1]);
document.body.dataset.ready = '1';
"""


def _json_for_html(data: dict[str, Any]) -> str:
    """JSON that cannot end the ``<script>`` element it sits in."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(data: dict[str, Any], title: str = "qstar thoughts") -> str:
    """The page (a string) for :func:`qstar.analysis.viewer.view_data`'s dict."""
    model = data.get("model", {})
    info = ", ".join(f"{k} {v}" for k, v in model.items())
    head = f"{title} ({info})" if info else title
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_escape(head)}</h1>\n"
        f"<div class='muted'>{_escape(data.get('source', ''))}</div>\n"
        "<p>Each token is coloured by the gain of thinking before it: the loss of that token "
        "without a thought minus with the model's greedy thought (blue: thinking helped, red: "
        "it hurt). Click a token for its thought, sampled thoughts, mixing weight and "
        "predictions.</p>\n"
        "<div id='legend'>gain (nats): </div><p id='totals'></p>\n"
        "<div id='text'></div>\n<div id='detail' class='muted'>Click a token.</div>\n"
        "<h3>Positions by gain</h3><label><input type='checkbox' id='hard'> only the hardest "
        "10% of tokens (highest loss without a thought)</label><div id='strip'></div>\n"
        f"<script type='application/json' id='qstar-data'>{_json_for_html(data)}</script>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def _escape(text: str) -> str:
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&#39;")
    )


def write_page(data: dict[str, Any], out: Path, title: str = "qstar thoughts") -> Path:
    """``out/thoughts.html`` and ``out/thoughts.json`` (the same data, for notebooks)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "thoughts.json").write_text(
        json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    page = out / "thoughts.html"
    page.write_text(render(data, title), encoding="utf-8")
    return page
