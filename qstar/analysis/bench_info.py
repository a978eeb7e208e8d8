"""What every benchmark file records about how it was made: the qstar git commit (and whether
the checkout had uncommitted changes) and the exact command line."""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

from qstar.runs.tracking import git_info

KEYS = ("git_sha", "git_dirty", "command")


def run_info() -> dict[str, Any]:
    """``{"git_sha", "git_dirty", "command"}`` of this process (the JSON files' keys)."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else []
    return {**git_info(), "command": shlex.join(argv)}


def header(title: str, meta: dict[str, Any]) -> list[str]:
    """The Markdown file's first lines: title, command, code version, then the rest of ``meta``
    as the environment."""
    sha = meta.get("git_sha") or "unknown (not a git checkout)"
    dirty = " (with uncommitted changes)" if meta.get("git_dirty") else ""
    env = {k: v for k, v in meta.items() if k not in KEYS}
    lines = [
        f"# {title}",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Code: qstar git {sha}{dirty}",
        "",
    ]
    return lines + ([f"Environment: {json.dumps(env)}", ""] if env else [])
