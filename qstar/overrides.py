"""The ``section.key=value`` override grammar, shared by every command that takes overrides.

Values are read as YAML and coerced to the annotated type of the field they set; unknown keys fail
naming the closest valid one. Nothing here knows the config tree: callers pass the defaults tree
(``merge_into``) or the field's type hint (``coerce``).
"""

from __future__ import annotations

from typing import Any


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> ``(["a", "b"], value)``; the value is read as YAML (``3``, ``true``, ``[1, 2]``)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def did_you_mean(name: str, options) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``options``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def merge_into(tree: dict[str, Any], path: list[str], value: Any, where: str = "") -> None:
    """Set ``tree[path]`` strictly: every key must already exist in the defaults tree."""
    node = tree
    for depth, key in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if not isinstance(node, dict) or key not in node:
            options = sorted(node) if isinstance(node, dict) else []
            raise ValueError(
                f"unknown config key {dotted!r}{where}{did_you_mean(key, options)}; "
                f"valid keys here: {', '.join(options)}"
            )
        if depth == len(path) - 1:
            if isinstance(node[key], dict):
                if not isinstance(value, dict):
                    raise ValueError(
                        f"{dotted}{where} is a section; set its keys, e.g. {dotted}.KEY=VALUE"
                    )
                for sub, subvalue in value.items():
                    merge_into(tree, path + [str(sub)], subvalue, where)
            else:
                node[key] = value
        node = node[key]


def coerce(dotted: str, value: Any, hint: Any) -> Any:
    """Coerce YAML/CLI values to the annotated type, or raise naming the key."""
    import types
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(dotted, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{dotted} must be a list, got {value!r}")
        return [coerce(dotted, v, args[0] if args else str) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError(f"{dotted} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{dotted} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        raise ValueError(f"{dotted} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (no/yes) as a boolean
            return "on" if value else "off"
        if isinstance(value, int | float):
            return str(value)
        raise ValueError(f"{dotted} must be a string, got {value!r}")
    return value
