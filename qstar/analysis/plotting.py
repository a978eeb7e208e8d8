"""Matplotlib set up once for reports: a headless backend and reproducible files."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"svg.hashsalt": "qstar", "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3}
    )
    return plt


def save(fig, out: Path, name: str) -> list[Path]:
    """PNG and SVG, without timestamps, so reruns reproduce the same files."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    _plt().close(fig)
    return paths
