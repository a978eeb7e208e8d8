"""Every committed number regenerates from committed data.

A committed report is a folder ``reports/NAME/`` with ``report.md``, ``figures/``, optionally
``reading.md`` (the written interpretation, an input) and ``data/``: the data bundle ``qstar
report`` wrote beside it (:mod:`qstar.analysis.files`). :func:`check_reports` re-renders each
from its bundle alone and compares; :func:`render_reports` re-renders them in place (``make
reports``); :func:`broken_links` finds relative Markdown links that point nowhere.

``python -m qstar.analysis.bundle [ROOT]`` re-renders every report under ROOT (default
``reports``) and lists what does not regenerate; ``--check`` only checks.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

from qstar.analysis import files
from qstar.analysis.report import write_report

# folders of reports/ that are not reports made by `qstar report` from a bundle
NOT_BUNDLED = ("archive", "bench")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def report_dirs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` with a ``report.md``, except those under ``archive/`` and
    ``bench/`` and inside a data bundle."""
    root = Path(root)
    found = []
    for report in sorted(root.rglob("report.md")):
        parts = report.relative_to(root).parts
        if parts[0] in NOT_BUNDLED or "data" in parts[:-1]:
            continue
        found.append(report.parent)
    return found


def _reading(report_dir: Path) -> Path | None:
    reading = report_dir / "reading.md"
    return reading if reading.is_file() else None


def render(report_dir: Path, out: Path | None = None) -> Path:
    """Re-render ``report_dir`` from its bundle into ``out`` (default: in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are in report.md
        return write_report(
            report_dir / "data",
            out or report_dir,
            reading=_reading(report_dir),
            bundle=out is None,
        )


def linked_files(markdown: str) -> list[str]:
    """Relative link targets of a Markdown text (no URLs, no anchors, nothing in code)."""
    text = CODE.sub("", markdown)
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return [t for t in out if t]


def broken_links(paths: list[Path]) -> list[str]:
    """``"FILE: TARGET"`` for every relative link of the Markdown ``paths`` to a missing file."""
    problems = []
    for path in paths:
        for target in linked_files(path.read_text(encoding="utf-8")):
            if not (path.parent / target).exists():
                problems.append(f"{path}: link to missing {target}")
    return problems


def check_report(report_dir: Path) -> list[str]:
    """What keeps ``report_dir`` from regenerating: no bundle, a re-render that fails or differs
    from the committed report.md, a figure the report links that is not committed."""
    if not files.is_bundle(report_dir / "data"):
        return [f"{report_dir}: no data bundle (data/bundle.json); make it with qstar report"]
    committed = report_dir / "report.md"
    problems = [
        f"{report_dir}: report.md links to missing {t}"
        for t in linked_files(committed.read_text(encoding="utf-8"))
        if t.startswith("figures/") and not (report_dir / t).is_file()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fresh = render(report_dir, Path(tmp)).read_text(encoding="utf-8")
        except Exception as exc:  # any failure is a finding, named
            return problems + [f"{report_dir}: re-rendering from data/ failed: {exc!r}"]
    old = committed.read_text(encoding="utf-8")
    if fresh != old:
        problems.append(
            f"{report_dir}: report.md differs from its re-render ({_first_diff(old, fresh)})"
        )
    return problems


def _first_diff(old: str, new: str) -> str:
    a, b = old.splitlines(), new.splitlines()
    for i, (x, y) in enumerate(zip(a, b, strict=False), 1):
        if x != y:
            return f"line {i}: committed {x[:80]!r}, re-rendered {y[:80]!r}"
    return f"committed {len(a)} lines, re-rendered {len(b)}"


def check_reports(root: str | Path) -> list[str]:
    """Problems of every report under ``root`` (see :func:`check_report`); ``[]`` when each
    regenerates byte-identically from its committed data bundle."""
    return [p for d in report_dirs(root) for p in check_report(d)]


def render_reports(root: str | Path) -> list[Path]:
    """Re-render in place every report under ``root`` that has a bundle."""
    return [render(d) for d in report_dirs(root) if files.is_bundle(d / "data")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qstar.analysis.bundle", description=__doc__)
    p.add_argument("root", nargs="?", default="reports")
    p.add_argument("--check", action="store_true", help="only check; change nothing")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not args.check:
        for report in render_reports(root):
            print(f"rendered {report}")
    problems = check_reports(root) + broken_links(sorted(root.rglob("*.md")))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
