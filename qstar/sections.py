"""The sections of a run's config tree, one dataclass each with ``validate()`` (raising
``ValueError`` naming the key and the fix): the model, Quiet-STaR (model settings and the
objective), data, optimiser, training, evaluation, the STaR family's question-answer data and
each of its methods, logging. :mod:`qstar.run_config` assembles them into one tree."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, fields
from typing import Any

from qstar.config import (
    ObjectiveConfig,
    QuietStarConfig,
    _choice,
    _float_ge,
    _float_gt,
    _int_in,
)

PRECISIONS = ("bf16-autocast", "fp32", "bf16")
WINDOWINGS = ("random", "pack")
BAD_ROW_POLICIES = ("error", "skip")
SCHEDULES = ("constant", "linear", "cosine")
OBJECTIVES = ("quiet_star", "lm")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")
TRAINABLE = ("all", "heads", "lora")
TASKS_AT = ("every", "end", "start_end")
ON_NONFINITE = ("error", "skip")
FUSED_CE = ("off", "chunked")
CLIP_MODES = ("global", "per_role")


@dataclass(frozen=True)
class QuietStarSection(ObjectiveConfig, QuietStarConfig):
    """The ``quiet_star`` section: the model's settings (:class:`~qstar.config.QuietStarConfig`,
    saved with it) and the objective's (:class:`~qstar.config.ObjectiveConfig`, a training
    setting) under one name, as configs write them. ``model_config()`` and ``objective()``
    split them."""

    def validate(self) -> None:
        QuietStarConfig.validate(self)
        ObjectiveConfig.validate(self)
        self.objective().check_thoughts(self.n_thoughts)
        if self.think_at == "gate" and not self.gate:
            raise ValueError(
                "think_at=gate chooses positions by the gate head's predictions: set "
                "quiet_star.gate=true (a new gate learns from the gains each step measures)"
            )

    def model_config(self) -> QuietStarConfig:
        return QuietStarConfig(**{f.name: getattr(self, f.name) for f in fields(QuietStarConfig)})

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """AdamW with the paper's defaults; linear warmup, then ``schedule``.

    ``clip``: ``global`` clips the gradient of all parameters together to norm ``grad_clip``
    (the authors'); ``per_role`` clips each parameter role (trunk, embeddings, meta tokens,
    mixing head, adapter; :mod:`qstar.runs.diagnostics`) to that norm on its own, so one role's
    large gradient (the meta tokens', 99% of the global norm in ``smollm2_math``) does not set
    the others' step weights. ``meta_lr_scale``, ``mixing_head_lr_scale``,
    ``adapter_lr_scale``: learning-rate multipliers of those roles (parameter groups); with
    ``quiet_star.meta_scale=1`` and ``meta_lr_scale=100`` the meta tokens get the authors' 100x
    as a learning rate instead of ÷100 storage (equal under Adam, except in clipping and
    epsilon)."""

    lr: float = 1e-6
    weight_decay: float = 0.001
    warmup_steps: int = 20
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    clip: str = "global"
    meta_lr_scale: float = 1.0
    mixing_head_lr_scale: float = 1.0
    adapter_lr_scale: float = 1.0

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
        _choice("clip", self.clip, CLIP_MODES)
        for name in ("meta_lr_scale", "mixing_head_lr_scale", "adapter_lr_scale"):
            _float_gt(name, getattr(self, name), 0.0)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multiplier by parameter role (1 for the others)."""
        return {
            "meta": self.meta_lr_scale,
            "mixing_head": self.mixing_head_lr_scale,
            "adapter": self.adapter_lr_scale,
        }


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
    the mixing head: thoughts can then be learned but the model's own predictions cannot change;
    ``trainable: lora`` freezes the language model (in bf16 under bf16 autocast) and trains
    PEFT LoRA adapters of rank ``lora_rank`` (scale ``lora_alpha / lora_rank``) on the
    ``lora_targets`` linear layers (comma-separated names, or ``all-linear``) with the meta
    tokens, the mixing head and a thinker in fp32; ``final/`` holds the merged model (and the
    adapter alone in ``final/adapter``), checkpoints only what trains. ``on_nonfinite``: a NaN/inf loss part, gradient
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
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    thought_len_schedule: str = ""

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
        _int_in("lora_rank", self.lora_rank, 1, 4096)
        thought_len_schedule(self.thought_len_schedule)  # validates
        _float_gt("lora_alpha", self.lora_alpha, 0.0)
        if self.trainable == "lora" and self.parallel == "fsdp":
            raise ValueError(
                "trainable=lora with parallel=fsdp: a LoRA run keeps the frozen weights whole in "
                "every process; use parallel=ddp (the frozen bf16 base is what lets one GPU hold "
                "a 7B model)"
            )
        if not isinstance(self.method, str) or not self.method:
            raise ValueError("method must name a training method (qstar.recipes.registry.names())")


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
    ``qa``: a Quiet-STaR run also answers ``qa.eval_questions`` held-out questions of
    ``qa.task`` at every evaluation, greedily, thinking while it writes if ``qa.think``
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
class LoggingSection:
    """``metrics.jsonl`` is always written; TensorBoard and MLflow are optional sinks.

    Every training row carries ``grad_norm/ROLE`` (trunk, embeddings, meta, mixing_head; before
    clipping) and ``grad_clip_coef``. ``param_stats`` adds ``update_norm/ROLE`` per step and
    ``changed_frac/ROLE`` (fraction of weights that differ from step 0) per evaluation, at the
    cost of two copies of the parameters; ``grad_parts`` adds ``grad_norm/policy/ROLE`` and
    ``grad_norm/nll/ROLE`` (the REINFORCE term's share of the gradient and the rest) at the cost
    of one more backward per micro-batch (see :mod:`qstar.runs.diagnostics`)."""

    tensorboard: bool = True
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    experiment: str = "qstar"
    progress: bool = True
    param_stats: bool = False
    grad_parts: bool = False

    def validate(self) -> None:
        if self.mlflow:
            if importlib.util.find_spec("mlflow") is None:
                raise ValueError("mlflow is true but mlflow is not installed: pip install mlflow")


def thought_len_schedule(spec: str) -> list[tuple[int, int]]:
    """``train.thought_len_schedule``: ``"8@0,4@50"`` -> ``[(0, 8), (50, 4)]``: thought length 8
    from step 0, 4 from step 50 (a curriculum: Fast Quiet-STaR's long thoughts first, or the
    reverse). Empty: the ``quiet_star.thought_len`` throughout."""
    if not spec.strip():
        return []
    out = []
    for part in spec.split(","):
        length, sep, step = part.strip().partition("@")
        if not (sep and length.isdecimal() and step.isdecimal() and 1 <= int(length) <= 256):
            raise ValueError(
                f"thought_len_schedule must look like 8@0,4@50 (thought length @ first step), "
                f"got {spec!r}"
            )
        out.append((int(step), int(length)))
    out.sort()
    if out[0][0] > 1:
        raise ValueError(f"thought_len_schedule must start at step 0 or 1, got {spec!r}")
    return out
