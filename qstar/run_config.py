"""The run config tree: one typed, validated tree for a training run (model, data, optim, train,
eval, logging and the method's :class:`~qstar.config.QuietStarConfig`), and its one merge order:
defaults -> YAML file -> ``a.b=c`` overrides. Unknown keys and invalid values fail before any work,
naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstar.config import (
    QuietStarConfig,
    _choice,
    _float_ge,
    _float_gt,
    _int_in,
    upgrade_legacy,
)
from qstar.overrides import coerce, merge_into, parse_override

# ============================================================================ the run config tree
# One typed tree for a training run; one merge order: defaults -> YAML -> `a.b=c` overrides.
# Unknown keys and invalid values fail before any work, naming the dotted key.

PRECISIONS = ("bf16-autocast", "fp32", "bf16")
WINDOWINGS = ("random", "pack")
BAD_ROW_POLICIES = ("error", "skip")
SCHEDULES = ("constant", "linear", "cosine")
OBJECTIVES = ("quiet_star", "lm")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")
TRAINABLE = ("all", "heads")
TASKS_AT = ("every", "end", "start_end")
ON_NONFINITE = ("error", "skip")
FUSED_CE = ("off", "chunked")
METHODS = ("quiet_star", "star", "trice", "vstar")
QA_TASKS = ("gsm8k", "csqa")


@dataclass
class ModelSection:
    """``name``: hub id, local directory, ``.gguf`` file, or ``tiny:ARCH`` (a random test model)."""

    name: str = "HuggingFaceTB/SmolLM2-135M"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name must be a hub id, a directory, a .gguf file or tiny:ARCH")


@dataclass
class DataSection:
    """Where training text comes from and how it is cut into windows.

    ``source``: a hub dataset id (streamed), a local ``.jsonl``/``.json``/``.parquet``/``.txt``
    file, a directory or glob of them, or ``builtin:NAME`` (small texts shipped with qstar).
    Hub ids with a known local layout (GSM8K, CommonsenseQA, C4) are read from ``data_dir``
    (or ``$QSTAR_DATA_DIR``) when the file is there.
    """

    source: str = "open-web-math/open-web-math"
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    template: str | None = None
    window: int = 256
    windowing: str = "random"
    max_documents: int | None = 1000
    on_bad_row: str = "error"
    val_source: str | None = None
    val_split: str | None = None
    val_documents: int = 32
    data_dir: str | None = None
    shuffle_buffer: int = 10000

    def validate(self) -> None:
        _int_in("window", self.window, 8, 1 << 16)
        _choice("windowing", self.windowing, WINDOWINGS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        if self.max_documents is not None:
            _int_in("max_documents", self.max_documents, 1, 1 << 40)
        _int_in("val_documents", self.val_documents, 0, 1 << 30)
        _int_in("shuffle_buffer", self.shuffle_buffer, 1, 1 << 30)
        if not self.source:
            raise ValueError(
                "source must name a hub dataset, a local file/directory/glob or builtin:NAME"
            )


@dataclass
class OptimSection:
    """AdamW with the paper's defaults; linear warmup, then ``schedule``."""

    lr: float = 1e-6
    weight_decay: float = 0.001
    warmup_steps: int = 20
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"

    def validate(self) -> None:
        _float_gt("lr", self.lr, 0.0)
        _float_ge("weight_decay", self.weight_decay, 0.0)
        _int_in("warmup_steps", self.warmup_steps, 0, 1 << 30)
        _float_ge("grad_clip", self.grad_clip, 0.0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        _float_gt("eps", self.eps, 0.0)
        _choice("schedule", self.schedule, SCHEDULES)


@dataclass
class TrainSection:
    """``batch_size`` sequences per optimiser step, ``micro_batch_size`` per forward (the rest is
    gradient accumulation). ``objective: lm`` trains the plain LM on the same data (the paper's
    no-thought baseline). ``compile`` compiles each decoder layer with ``torch.compile`` (worth it
    on GPUs; on CPUs the first step spends minutes compiling). ``parallel`` says how several
    processes (``torchrun``, or ``resources.workers`` in a sweep) share the work: ``ddp``
    replicates the model, ``fsdp`` shards parameters, gradients and optimiser state (FSDP2,
    one unit per decoder layer) for models that do not fit one device. ``trainable: heads``
    freezes the language model (trunk, embeddings, LM head) and trains only the meta tokens and
    the mixing head: thoughts can then be learned but the model's own predictions cannot change. ``on_nonfinite``: a NaN/inf loss part, gradient
    norm or weight stops the run (``error``, keeping the last good checkpoint), or the update is
    skipped and counted (``skip``), failing after ``skip_limit`` consecutive skips. ``fused_ce:
    chunked`` (the default) computes every ``log p(token)`` of the step through the fused,
    chunked LM head (:mod:`qstar.core.head`; exact; no vocabulary-wide logits kept for backward);
    ``off`` materialises the logits (the reference path)."""

    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 4
    precision: str = "bf16-autocast"
    device: str = "auto"
    seed: int = 0
    objective: str = "quiet_star"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    log_every: int = 1
    compile: bool = False
    parallel: str = "ddp"
    trainable: str = "all"
    on_nonfinite: str = "error"
    skip_limit: int = 5
    fused_ce: str = "chunked"
    method: str = "quiet_star"

    def validate(self) -> None:
        _int_in("steps", self.steps, 1, 1 << 30)
        _int_in("batch_size", self.batch_size, 1, 1 << 20)
        _int_in("micro_batch_size", self.micro_batch_size, 1, 1 << 20)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _int_in("seed", self.seed, 0, 2**63 - 1)
        _choice("objective", self.objective, OBJECTIVES)
        _int_in("checkpoint_every", self.checkpoint_every, 0, 1 << 30)
        _int_in("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        _int_in("log_every", self.log_every, 1, 1 << 30)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _int_in("skip_limit", self.skip_limit, 1, 1 << 30)
        _choice("fused_ce", self.fused_ce, FUSED_CE)
        _choice("method", self.method, METHODS)


@dataclass
class EvalSection:
    """Every ``every`` steps (0: only at the start and the end): held-out NLL with and without
    thoughts on ``windows`` validation windows (per-token values in ``RUN_DIR/heldout/``), and
    lm-eval ``tasks`` with ``limit`` examples (task YAML directories in ``include_paths``;
    per-example scores in ``RUN_DIR/tasks/``).

    ``heldout_seed`` picks the held-out windows (default: ``train.seed``); fix it, with
    ``data.val_source``, to score every seed of a sweep on the same text. ``tasks_at``: run the
    tasks at ``every`` evaluation, only at the ``end``, or at ``start_end``. ``tasks_both``: a
    Quiet-STaR run also scores the tasks without thinking (logged as ``eval/TASK:nothink/...``).
    ``qa``: a Quiet-STaR run also answers ``star.eval_questions`` held-out questions of
    ``star.task`` at every evaluation, greedily, thinking while it writes if ``star.think``
    (``eval/qa_acc``: the figure the STaR-family recipes report, for comparisons across methods).
    """

    every: int = 10
    windows: int = 16
    batch_size: int = 4
    tasks: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None
    include_paths: list[str] = dataclasses.field(default_factory=list)
    heldout_seed: int | None = None
    tasks_at: str = "every"
    tasks_both: bool = False
    qa: bool = False

    def validate(self) -> None:
        _choice("tasks_at", self.tasks_at, TASKS_AT)
        if self.heldout_seed is not None:
            _int_in("heldout_seed", self.heldout_seed, 0, 2**63 - 1)
        _int_in("every", self.every, 0, 1 << 30)
        _int_in("windows", self.windows, 0, 1 << 20)
        _int_in("batch_size", self.batch_size, 1, 1 << 20)
        if self.limit is not None:
            _int_in("limit", self.limit, 1, 1 << 30)


@dataclass
class StarSection:
    """The STaR family on question-answer data (``train.method: star``; see
    :mod:`qstar.recipes.star`). Each of ``iterations`` samples a rationale for ``questions``
    training questions of ``task`` (``source``/``split``: resolved like ``data.source``; default
    the task's hub id; a local file needs ``eval_source`` for the held-out questions) with the current model (``shots`` worked examples as the prompt, at
    ``temperature``, up to ``max_new_tokens``; ``think``: a Quiet-STaR model thinks while it
    writes), keeps the correct ones, *rationalises* the wrong ones (``rationalize``: the answer as
    a hint, dropped from the training text), and fine-tunes the *base* model on what was kept for
    ``steps_per_iteration`` steps, growing by ``step_growth`` each iteration (the STaR paper:
    1.2). After each iteration the model answers ``eval_questions`` questions of ``eval_split``
    greedily (accuracy by answer checking).

    ``train.method=trice`` (:mod:`qstar.recipes.trice`) keeps a memory of one correct rationale
    for each of ``questions`` training questions and trains for ``train.steps`` steps of
    ``train.batch_size`` questions; ``vstar`` (:mod:`qstar.recipes.vstar`) runs STaR as its
    generator, then trains a verifier from the base model with DPO (``dpo_beta``) on (correct,
    incorrect) pairs of the same question for ``verifier_steps`` steps, and scores the best of
    ``samples`` solutions by the verifier."""

    task: str = "gsm8k"
    source: str | None = None
    split: str = "train"
    eval_source: str | None = None
    eval_split: str = "test"
    iterations: int = 3
    questions: int = 64
    eval_questions: int = 32
    shots: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    rationalize: bool = True
    think: bool = False
    steps_per_iteration: int = 10
    step_growth: float = 1.0
    generation_batch: int = 16
    samples: int = 4
    verifier_steps: int = 10
    dpo_beta: float = 0.1

    def validate(self) -> None:
        _choice("task", self.task, QA_TASKS)
        _int_in("samples", self.samples, 1, 1 << 10)
        _int_in("verifier_steps", self.verifier_steps, 0, 1 << 30)
        _float_gt("dpo_beta", self.dpo_beta, 0.0)
        _int_in("iterations", self.iterations, 0, 1 << 20)
        _int_in("questions", self.questions, 1, 1 << 30)
        _int_in("eval_questions", self.eval_questions, 0, 1 << 30)
        _int_in("shots", self.shots, 0, 4)
        _float_ge("temperature", self.temperature, 0.0)
        _int_in("max_new_tokens", self.max_new_tokens, 1, 1 << 16)
        _int_in("steps_per_iteration", self.steps_per_iteration, 1, 1 << 30)
        _float_ge("step_growth", self.step_growth, 1.0)
        _int_in("generation_batch", self.generation_batch, 1, 1 << 20)


@dataclass
class LoggingSection:
    """``metrics.jsonl`` is always written; TensorBoard and MLflow are optional sinks.

    Every training row carries ``grad_norm/ROLE`` (trunk, embeddings, meta, mixing_head; before
    clipping) and ``grad_clip_coef``. ``param_stats`` adds ``update_norm/ROLE`` per step and
    ``changed_frac/ROLE`` (fraction of weights that differ from step 0) per evaluation, at the
    cost of two copies of the parameters; ``grad_parts`` adds ``grad_norm/policy/ROLE`` and
    ``grad_norm/nll/ROLE`` (the REINFORCE term's share of the gradient and the rest) at the cost
    of one more backward per micro-batch (see :mod:`qstar.diagnostics`)."""

    tensorboard: bool = True
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    experiment: str = "qstar"
    progress: bool = True
    param_stats: bool = False
    grad_parts: bool = False

    def validate(self) -> None:
        if self.mlflow:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                raise ValueError("mlflow is true but mlflow is not installed: pip install mlflow")


@dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    quiet_star: QuietStarConfig = dataclasses.field(default_factory=QuietStarConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    star: StarSection = dataclasses.field(default_factory=StarSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def accumulation(self) -> int:
        return self.train.batch_size // self.train.micro_batch_size


def _section_types() -> dict[str, type]:
    import typing

    return typing.get_type_hints(RunConfig)


def build_run_config(tree: dict[str, Any]) -> RunConfig:
    """Typed, validated :class:`RunConfig` from a full nested dict."""
    import typing

    sections = {}
    for name, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        values = {
            key: coerce(f"{name}.{key}", value, hints[key]) for key, value in tree[name].items()
        }
        try:
            section = cls(**values)
            section.validate()
        except ValueError as exc:
            raise ValueError(f"{name}.{exc}") from None
        sections[name] = section
    cfg = RunConfig(**sections)
    if cfg.train.parallel == "fsdp" and cfg.eval.tasks and cfg.eval.tasks_at != "end":
        raise ValueError(
            "eval.tasks during training needs the whole model in one process, which "
            "train.parallel=fsdp does not keep; set eval.tasks_at=end (the tasks then run on the "
            "gathered final model after training) or evaluate it with `qstar eval`"
        )
    return cfg


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
    import yaml

    tree = RunConfig().to_dict()
    if path is not None:
        from pathlib import Path

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        if "quiet_star" in data:
            data["quiet_star"] = upgrade_legacy(data["quiet_star"])
        for key, value in data.items():
            merge_into(tree, [str(key)], value, where=f" in {path}")
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["quiet_star", "positive_rewards"]:  # the old name of reward_filter
            ((key, value),) = upgrade_legacy({"positive_rewards": value}).items()
            keys = ["quiet_star", key]
        merge_into(tree, keys, value, where=" in overrides")
    return build_run_config(tree)
