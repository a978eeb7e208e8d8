"""The Quiet-STaR hyper-parameters: one typed dataclass, validated eagerly.

Defaults reproduce the authors' training code (Zelikman et al. 2024, `quiet-star-train.py`),
which is what produced the published numbers; the paper's text variants are named options.

Token counts. The authors' code counts ``n_ahead = thought_len + 3`` (the base pass, ``<start>``,
``<end>`` and the sampled tokens); its "12 ahead" setting samples 9 thought tokens, so
``QuietStarConfig.from_authors(n_ahead=12, n_ahead_talk=4, n_passes=2)`` equals the defaults here.
Model passes per training step: ``1 base + 1 <start> + thought_len + 1 <end> + (n_true - 1)``
``= thought_len + 2 + n_true`` (the code's ``n_ahead + n_ahead_talk - 1``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MIXING_CHOICES = ("hidden", "logprob")
POLICY_LOGPROB_CHOICES = ("per_token", "per_thought")
ATTENTION_CHOICES = ("sparse", "flex", "einsum", "dense")


@dataclass(frozen=True)
class QuietStarConfig:
    """Hyper-parameters of think / talk / learn (frozen: change one with :meth:`replace`, or for a
    block of code with :meth:`qstar.QuietStar.using`).

    Attributes:
        thought_len: sampled thought tokens per position, without ``<start>``/``<end>`` (``t``).
        n_true: true future tokens predicted after each thought (lookahead, the code's
            ``n_ahead_talk``).
        n_thoughts: thoughts sampled per position (``k``, the code's ``n_passes``); the REINFORCE
            baseline is the mean over them, so ``k = 1`` gives zero rewards.
        mixing: ``"hidden"`` mixes hidden states before the LM head with an unbounded weight
            (the authors' code); ``"logprob"`` interpolates log-probabilities with a weight in
            [0, 1] (sigmoid), as the paper's text describes.
        base_loss_weight / mixed_loss_weight: weights of the base-LM NLL and of the mean over the
            ``n_true`` mixed NLLs (the code's ``original_loss_weight = 0.5``).
        policy_weight: weight of the REINFORCE term (the code's ``policy_loss_beta = 1e6``).
        policy_temperature: temperature of the thought log-probabilities in the policy term
            (the code's ``reinforce_temperature = 3``).
        policy_logprob: ``"per_token"`` averages the policy term over thought tokens (code);
            ``"per_thought"`` uses the whole thought's log-probability (paper).
        positive_rewards: keep only positive rewards (clamp at 0), as the code does.
        thought_temperature: sampling temperature of thought tokens (1.0: the code's hard
            Gumbel trick, which is exactly categorical sampling at T=1).
        meta_scale: the meta-token embeddings are stored divided by this factor and multiplied
            back on use; under Adam this multiplies their effective learning rate by it (100).
        attention: ``"sparse"`` computes thought attention as a causal prefix part plus a
            per-position diagonal part without a dense mask (FlexAttention with a block mask on
            CUDA; elsewhere the fused kernel: PyTorch's flash kernel for the prefix part, or the
            einsum kernel under sliding windows, softcapping or dropout; ``"flex"`` /
            ``"einsum"`` force one); ``"dense"``
            is the plain reference that materialises the authors' additive mask and runs the
            model's eager attention.
        start_token / end_token: the two meta tokens added to the tokenizer.
        meta_init_text: text whose first token's embedding initialises both meta tokens.
    """

    thought_len: int = 9
    n_true: int = 4
    n_thoughts: int = 2
    mixing: str = "hidden"
    base_loss_weight: float = 0.5
    mixed_loss_weight: float = 0.5
    policy_weight: float = 1e6
    policy_temperature: float = 3.0
    policy_logprob: str = "per_token"
    positive_rewards: bool = True
    thought_temperature: float = 1.0
    meta_scale: float = 100.0
    attention: str = "sparse"
    start_token: str = "<|startofthought|>"
    end_token: str = "<|endofthought|>"
    meta_init_text: str = "---"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values."""
        _int_in("thought_len", self.thought_len, 1, 256)
        _int_in("n_true", self.n_true, 1, 256)
        _int_in("n_thoughts", self.n_thoughts, 1, 64)
        _choice("mixing", self.mixing, MIXING_CHOICES)
        _choice("policy_logprob", self.policy_logprob, POLICY_LOGPROB_CHOICES)
        _choice("attention", self.attention, ATTENTION_CHOICES)
        for name in ("base_loss_weight", "mixed_loss_weight", "policy_weight"):
            _float_ge(name, getattr(self, name), 0.0)
        for name in ("policy_temperature", "thought_temperature", "meta_scale"):
            _float_gt(name, getattr(self, name), 0.0)
        if not isinstance(self.positive_rewards, bool):
            raise ValueError(
                f"positive_rewards must be true or false, got {self.positive_rewards!r}"
            )
        for name in ("start_token", "end_token", "meta_init_text"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.start_token == self.end_token:
            raise ValueError("start_token and end_token must differ")

    # ------------------------------------------------------------------ derived counts
    @property
    def thought_block(self) -> int:
        """Tokens fed per position after the base pass: <start>, c_1..c_t, <end>, n_true-1 true."""
        return self.thought_len + 1 + self.n_true

    @property
    def passes(self) -> int:
        """Model passes per training step: ``thought_len + 2 + n_true``."""
        return self.thought_len + 2 + self.n_true

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_authors(cls, n_ahead: int, n_ahead_talk: int, n_passes: int = 2, **kw: Any):
        """Build from the authors' counts: ``thought_len = n_ahead - 3``."""
        if n_ahead < 4:
            raise ValueError(f"n_ahead must be >= 4 (thought_len = n_ahead - 3), got {n_ahead}")
        return cls(thought_len=n_ahead - 3, n_true=n_ahead_talk, n_thoughts=n_passes, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuietStarConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown QuietStarConfig key(s) {unknown}; valid keys: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> QuietStarConfig:
        return dataclasses.replace(self, **changes)


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _float_ge(name: str, value: Any, lo: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= lo:
        raise ValueError(f"{name} must be a number >= {lo}, got {value!r}")


def _float_gt(name: str, value: Any, lo: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > lo:
        raise ValueError(f"{name} must be a number > {lo}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


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
    chunked`` computes every ``log p(token)`` of the step through the fused, chunked LM head
    (:mod:`qstar.core.head`; exact, about half the saved activations, a few percent slower on
    CPU); ``off`` materialises the logits."""

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
    fused_ce: str = "off"

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


def _coerce(dotted: str, value: Any, hint: Any) -> Any:
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
        return _coerce(dotted, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{dotted} must be a list, got {value!r}")
        return [_coerce(dotted, v, args[0] if args else str) for v in value]
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


def build_run_config(tree: dict[str, Any]) -> RunConfig:
    """Typed, validated :class:`RunConfig` from a full nested dict."""
    import typing

    sections = {}
    for name, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        values = {
            key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in tree[name].items()
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


def quiet_star_overrides(texts: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["quiet_star.thought_len=5", ...]`` -> ``{"thought_len": 5}``: the override grammar of
    ``qstar train``, for commands that take only the method's knobs (``qstar eval``, ``qstar
    bench``). Unknown sections or keys fail naming the key; values are validated."""
    import typing

    hints = typing.get_type_hints(QuietStarConfig)
    out: dict[str, Any] = {}
    for text in texts:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if len(path) != 2 or path[0] != "quiet_star":
            raise ValueError(
                f"override {text!r}: only quiet_star.KEY=VALUE can be set here "
                f"(e.g. quiet_star.thought_len=5)"
            )
        if path[1] not in hints:
            raise ValueError(
                f"unknown config key {dotted!r}{did_you_mean(path[1], hints)}; "
                f"valid keys: {', '.join(sorted(hints))}"
            )
        out[path[1]] = _coerce(dotted, value, hints[path[1]])
    QuietStarConfig().replace(**out)  # validates the values
    return out


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
        for key, value in data.items():
            merge_into(tree, [str(key)], value, where=f" in {path}")
    for text in overrides:
        keys, value = parse_override(text)
        merge_into(tree, keys, value, where=" in overrides")
    return build_run_config(tree)
