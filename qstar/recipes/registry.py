"""The training methods by their ``train.method`` name: the one place that says which methods
exist, which recipe runs each and which config section it owns. The CLI, sweeps, reports and
held-out evaluation read it. A new method is one :func:`register` call beside its recipe."""

from __future__ import annotations

from dataclasses import dataclass

from qstar.recipes.base import Recipe
from qstar.run_config import RunConfig, register_section


@dataclass(frozen=True)
class Method:
    """``name``: the ``train.method`` value; ``recipe``: its :class:`Recipe` class;
    ``label``: how reports name it; ``sections``: the config sections it reads beyond the
    common ones (``model``, ``data``, ``optim``, ``train``, ``eval``, ``logging``), each a
    ``(name, dataclass)`` pair registered with the config tree (a shared one, like ``qa``,
    appears under every method that reads it)."""

    name: str
    recipe: type[Recipe]
    label: str
    sections: tuple[tuple[str, type], ...] = ()


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` runnable as ``train.method=NAME`` (its sections join the config tree)."""
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"a training method named {method.name!r} is registered already")
    for name, cls in method.sections:
        register_section(name, cls)
    _METHODS[method.name] = method
    return method


def names() -> list[str]:
    return list(_METHODS)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name fails listing the known ones."""
    if name not in _METHODS:
        raise ValueError(f"train.method must be one of {names()}, got {name!r}")
    return _METHODS[name]


def recipe_for(cfg: RunConfig) -> Recipe:
    """The recipe that runs ``cfg`` (``train.method``), checked (bad combinations fail here)."""
    recipe = get(cfg.train.method).recipe(cfg)
    recipe.check()
    return recipe
