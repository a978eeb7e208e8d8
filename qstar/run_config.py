"""The run config tree: one typed, validated tree for a training run (the sections of
:mod:`qstar.sections`, and any a new method registers), and its one merge order:
defaults -> YAML file -> ``a.b=c`` overrides. Unknown keys and invalid values fail before any work,
naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from qstar.config import upgrade_legacy
from qstar.overrides import coerce, merge_into, parse_override
from qstar.sections import (  # noqa: F401  (re-exported: configs and tests import them from here)
    FUSED_CE,
    OBJECTIVES,
    ON_NONFINITE,
    PARALLEL,
    PRECISIONS,
    TASKS_AT,
    TRAINABLE,
    DataSection,
    EvalSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    QuietStarSection,
    TrainSection,
)
from qstar.sections_qa import QASection, StarSection, TriceSection, VStarSection

# The built-in sections, in the order config files write them; a new method adds its own with
# register_section (qstar.recipes.registry.register does it for a method that has one).
SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "quiet_star": QuietStarSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "eval": EvalSection,
    "qa": QASection,
    "star": StarSection,
    "trice": TriceSection,
    "vstar": VStarSection,
    "logging": LoggingSection,
}


def register_section(name: str, cls: type) -> None:
    """Add a config section (a dataclass with ``validate()``) under ``name``: its keys then read
    from YAML and ``name.key=value`` overrides like any other section's."""
    if name in SECTIONS and SECTIONS[name] is not cls:
        raise ValueError(f"config section {name!r} exists already ({SECTIONS[name].__name__})")
    SECTIONS[name] = cls


class RunConfig:
    """The whole configuration of a run: one validated section per name in :data:`SECTIONS`
    (``cfg.train``, ``cfg.quiet_star``, ...). Build it with :func:`load_run_config`."""

    def __init__(self, **sections: Any):
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; known: {list(SECTIONS)}")
        self._sections = {name: sections.get(name) or cls() for name, cls in SECTIONS.items()}

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(section) for name, section in self._sections.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    @property
    def accumulation(self) -> int:
        return self.train.batch_size // self.train.micro_batch_size


def build_run_config(tree: dict[str, Any]) -> RunConfig:
    """Typed, validated :class:`RunConfig` from a full nested dict."""
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {
            key: coerce(f"{name}.{key}", value, hints[key])
            for key, value in tree.get(name, {}).items()
        }
        try:
            section = cls(**values)
            section.validate()
        except ValueError as exc:
            raise ValueError(f"{name}.{exc}") from None
        sections[name] = section
    cfg = RunConfig(**sections)
    if cfg.quiet_star.thinker == "lora" and cfg.train.trainable == "heads":
        raise ValueError(
            "quiet_star.thinker=lora with train.trainable=heads: heads trains only the meta "
            "tokens and the mixing head, so the thinker adapter would never learn; use "
            "train.trainable=all (with quiet_star.trunk_grad=lm_only to keep the LM's weights "
            "off the thinking terms)"
        )
    if cfg.train.parallel == "fsdp" and cfg.eval.tasks and cfg.eval.tasks_at != "end":
        raise ValueError(
            "eval.tasks during training needs the whole model in one process, which "
            "train.parallel=fsdp does not keep; set eval.tasks_at=end (the tasks then run on the "
            "gathered final model after training) or evaluate it with `qstar eval`"
        )
    return cfg


# Keys that moved: (old section, key) -> new section. The STaR family's section was one
# `star` for three methods; its question-answer part is now `qa`, V-STaR's own keys `vstar`.
MOVED_KEYS: dict[tuple[str, str], str] = {
    **{("star", f.name): "qa" for f in fields(QASection)},
    **{("star", f.name): "vstar" for f in fields(VStarSection)},
}


def upgrade_tree(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping written by an older qstar (a run directory's ``config.yaml``, a user's
    YAML) in today's layout: ``quiet_star.positive_rewards`` and the keys in
    :data:`MOVED_KEYS`."""
    data = dict(data)
    if isinstance(data.get("quiet_star"), dict):
        data["quiet_star"] = upgrade_legacy(data["quiet_star"])
    if isinstance(data.get("star"), dict):
        star = dict(data["star"])
        for key in list(star):
            target = MOVED_KEYS.get(("star", key))
            if target is not None:
                moved = dict(data.get(target) or {})
                moved.setdefault(key, star.pop(key))
                data[target] = moved
        data["star"] = star
    return data


def upgrade_override(keys: list[str], value: Any) -> tuple[list[str], Any]:
    """One ``a.b=c`` override in today's layout (:func:`upgrade_tree`)."""
    if keys == ["quiet_star", "positive_rewards"]:  # the old name of reward_filter
        ((key, value),) = upgrade_legacy({"positive_rewards": value}).items()
        return ["quiet_star", key], value
    if len(keys) == 2 and (keys[0], keys[1]) in MOVED_KEYS:
        return [MOVED_KEYS[(keys[0], keys[1])], keys[1]], value
    return keys, value


CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(name: str | None) -> str | None:
    """A YAML path, or the name of a shipped config (``qstar/configs/NAME.yaml``)."""
    if name is None or Path(name).is_file():
        return name
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name} is neither a file nor a shipped config ({names})")


def load_run_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """defaults -> YAML file -> ``a.b=c`` overrides, strictly; raises ``ValueError`` naming the key."""
    tree = RunConfig().to_dict()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        for key, value in upgrade_tree(data).items():
            merge_into(tree, [str(key)], value, where=f" in {path}")
    for text in overrides:
        keys, value = upgrade_override(*parse_override(text))
        merge_into(tree, keys, value, where=" in overrides")
    return build_run_config(tree)
