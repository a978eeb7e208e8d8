"""The files a report reads, and its data bundle.

Every reader in :mod:`qstar.analysis` goes through :func:`find` / :func:`read_text`, which take
``NAME`` or ``NAME.gz`` alike, so a report renders the same from an experiment folder and from
the compact copy of it that ``qstar report`` writes beside the report (``DIR/data/``, the *data
bundle*, see :func:`write_bundle`). The bundle has the layout of a sweep experiment and holds only
what the report reads::

    data/bundle.json                  name, whether model analyses ran, task versions
    data/trials.json                  the trials (a single run becomes a one-trial sweep)
    data/sweep.yaml, summary.csv      the sweep's own files, when present
    data/trials/ID/config.yaml, run.json, summary.json, error.txt, metrics.jsonl
    data/trials/ID/heldout/step_N.json.gz          per-token held-out NLL (float32, shortest)
    data/trials/ID/tasks/step_N/TASK[:nothink].jsonl  per-example task scores
    data/trials/ID/analysis/content_control.json.gz   the content control (cached)
    data/trials/ID/analysis/top_thoughts.json.gz      the highest-reward thoughts (cached)
    data/trials/ID/analysis/viewer.json.gz            the thought viewer's data (cached)

Checkpoints, ``final/`` (the weights), ``tb/`` and everything else are left out: a report
rendered from a bundle never loads a model; the analyses that do are read from their caches.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_META = "bundle.json"
BUNDLE_FORMAT = 1
# (glob under a trial's run dir, how it goes into the bundle: as is, gzipped, or gzipped with
# float32 numbers written in their shortest form, see compact_floats)
TRIAL_FILES = (
    ("config.yaml", "copy"),
    ("run.json", "copy"),
    ("summary.json", "copy"),
    ("error.txt", "copy"),
    ("metrics.jsonl", "copy"),
    ("heldout/step_*.json", "float32"),
    ("tasks/step_*/*.jsonl", "copy"),
)
MODEL_CACHES = (
    ("analysis/content_control.json", "float32"),
    ("analysis/top_thoughts.json", "gzip"),
    ("analysis/viewer.json", "gzip"),
)
EXPERIMENT_FILES = ("sweep.yaml", "summary.csv")


# ---------------------------------------------------------------------------- reading
def find(path: str | Path) -> Path | None:
    """``path`` itself, else ``path.gz``, else ``None``."""
    path = Path(path)
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def exists(path: str | Path) -> bool:
    return find(path) is not None


def read_text(path: str | Path) -> str:
    """The text of ``path`` or of ``path.gz`` (raises ``FileNotFoundError`` naming ``path``)."""
    found = find(path)
    if found is None:
        raise FileNotFoundError(f"{path} (nor {path}.gz) does not exist")
    if found.suffix == ".gz":
        return gzip.decompress(found.read_bytes()).decode("utf-8")
    return found.read_text(encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(read_text(path))


def matching(folder: Path, pattern: str) -> list[Path]:
    """The files under ``folder`` matching ``pattern`` or ``pattern.gz``, named without ``.gz``
    (pass them to :func:`read_text`), sorted by name with numbers compared as numbers."""
    if not folder.is_dir():
        return []
    names = {p.with_name(p.name.removesuffix(".gz")) for p in folder.glob(pattern + ".gz")}
    names |= set(folder.glob(pattern))
    return sorted(names, key=_natural)


def _natural(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def floats(values: list, doc: dict[str, Any]) -> np.ndarray:
    """``values`` of the JSON document ``doc`` as float64: through float32 where the document says
    its numbers are float32 (:func:`compact_floats`), which restores them exactly."""
    dtype = np.float32 if doc.get("dtype") == "float32" else np.float64
    return np.asarray(values, dtype=dtype).astype(np.float64)


def _all_float32(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and float(np.float32(value)) == value
    if isinstance(value, list):
        return all(_all_float32(v) for v in value)
    if isinstance(value, dict):
        return all(_all_float32(v) for v in value.values())
    return True


def _encode32(value: Any) -> str:
    if isinstance(value, float):
        return str(np.float32(value))  # the shortest text that reads back as this float32
    if isinstance(value, list):
        return "[" + ", ".join(_encode32(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_encode32(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _widen(value: Any) -> Any:
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, list):
        return [_widen(v) for v in value]
    if isinstance(value, dict):
        return {k: _widen(v) for k, v in value.items()}
    return value


def compact_floats(data: bytes) -> bytes:
    """A JSON document whose numbers are all float32 values (per-token NLL: about half the bytes
    are digits a float64 repr adds) rewritten with each in its shortest float32 form and
    ``"dtype": "float32"``; :func:`floats` reads them back to the very same values. Any other
    document is returned unchanged."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or "dtype" in doc or not _all_float32(doc):
        return data
    doc = {"dtype": "float32", **doc}
    text = _encode32(doc)
    return text.encode() if _widen(json.loads(text)) == doc else data


# ---------------------------------------------------------------------------- the bundle
def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_META).is_file()


def bundle_meta(path: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle, ``{}`` for an experiment folder."""
    meta = Path(path) / BUNDLE_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def write_gz(path: Path, data: bytes) -> None:
    """Gzip ``data`` into ``path`` reproducibly (no timestamp, no file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)


def _copy(src: Path, dst: Path, how: str) -> None:
    """``src`` (read as ``NAME`` or ``NAME.gz``) to ``dst`` as is (``copy``), or to ``dst.gz``
    (``gzip``; ``float32``: with :func:`compact_floats` first)."""
    found = find(src)
    if found is None:
        return
    data = found.read_bytes()
    if found != src:  # src.gz
        data = gzip.decompress(data)
    if how == "copy":
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return
    write_gz(dst.with_name(dst.name + ".gz"), compact_floats(data) if how == "float32" else data)


def write_bundle(
    exp_dir: Path,
    trial_dirs: list[tuple[str, Path, dict[str, Any]]],
    out: Path,
    meta: dict[str, Any],
    model_caches: bool,
    trials_spec: dict[str, Any] | None = None,
) -> Path:
    """Copy what a report reads from ``exp_dir`` into the bundle ``out`` (replacing an older
    bundle there; a folder that is not a bundle is refused). ``trial_dirs``: the experiment's
    ``(trial_id, run_dir, params)``; ``model_caches``: copy the model analyses' caches (the report
    showed them); ``trials_spec``: the bundle's ``trials.json`` when it is not ``exp_dir``'s (a
    report that read trials of other experiments)."""
    out = Path(out)
    if out.exists():
        if not is_bundle(out):
            raise ValueError(f"{out} exists and is not a data bundle; remove it or choose --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sweep = exists(exp_dir / "trials.json")
    if sweep:
        for name in EXPERIMENT_FILES:
            if (exp_dir / name).is_file():
                shutil.copyfile(exp_dir / name, out / name)
    if trials_spec is None and sweep:
        _copy(exp_dir / "trials.json", out / "trials.json", "copy")
    else:  # the given spec, or one run directory as a one-trial sweep
        spec = trials_spec if trials_spec is not None else one_run_spec(trial_dirs)
        (out / "trials.json").write_text(json.dumps(spec, indent=2) + "\n")
    patterns = TRIAL_FILES + MODEL_CACHES * model_caches
    for trial_id, run_dir, _ in trial_dirs:
        if not run_dir.is_dir():
            continue
        dst = out / "trials" / trial_id
        for pattern, how in patterns:
            for src in matching(run_dir, pattern):
                _copy(src, dst / src.relative_to(run_dir), how)
    (out / BUNDLE_META).write_text(
        json.dumps({"format": BUNDLE_FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    )
    return out


def one_run_spec(trial_dirs: list[tuple[str, Path, dict[str, Any]]]) -> dict[str, Any]:
    """``trials.json`` for trials that no sweep listed (a single run directory)."""
    return {"trials": [{"trial_id": t, "overrides": [], "params": p} for t, _, p in trial_dirs]}


def bundle_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
