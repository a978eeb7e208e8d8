"""The config sections of the STaR family (:mod:`qstar.sections` holds the others): the
question-answer data and sampling every method of the family shares (``qa``), and each method's
own (``star``, ``trice``, ``vstar``)."""

from __future__ import annotations

from dataclasses import dataclass

from qstar.config import _choice, _float_ge, _float_gt, _int_in

QA_TASKS = ("gsm8k", "csqa", "arith")


def digit_range(name: str, value: object) -> tuple[int, int]:
    """``"a-b"`` or ``"n"`` -> ``(a, b)``, the digit counts of :mod:`qstar.qa.arith`."""
    a, sep, b = str(value).replace(" ", "").partition("-")
    if a.isdecimal() and (b if sep else a).isdecimal() and 1 <= int(a) <= int(b or a) <= 20:
        return int(a), int(b or a)
    raise ValueError(f"{name} must be a range like 1-5 with 1 <= a <= b <= 20, got {value!r}")


@dataclass
class QASection:
    """Question-answer data and sampling, shared by the STaR family (``train.method: star``,
    ``trice``, ``vstar``) and by a Quiet-STaR run's ``eval.qa``: ``questions`` training
    questions of ``task`` (``source``/``split``: resolved like ``data.source``, default the
    task's hub id; a local file needs ``eval_source``; ``arith`` generates additions of
    ``digits``/``eval_digits`` digits, splits train/test, :mod:`qstar.qa.arith`), rationales
    sampled with ``shots`` worked examples at ``temperature``, up to ``max_new_tokens``
    (``think``: a Quiet-STaR model thinks while it writes), ``generation_batch`` at a time;
    ``eval_questions`` of ``eval_split``, answered greedily, give ``eval/qa_acc``."""

    task: str = "gsm8k"
    source: str | None = None
    split: str = "train"
    eval_source: str | None = None
    eval_split: str = "test"
    questions: int = 64
    eval_questions: int = 32
    shots: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    think: bool = False
    generation_batch: int = 16
    digits: str = "1-5"
    eval_digits: str = ""

    def validate(self) -> None:
        _choice("task", self.task, QA_TASKS)
        _int_in("questions", self.questions, 1, 1 << 30)
        _int_in("eval_questions", self.eval_questions, 0, 1 << 30)
        _int_in("shots", self.shots, 0, 4)
        _float_ge("temperature", self.temperature, 0.0)
        _int_in("max_new_tokens", self.max_new_tokens, 1, 1 << 16)
        _int_in("generation_batch", self.generation_batch, 1, 1 << 20)
        if self.task == "arith":  # each split holds half of a digit count's pairs: disjoint
            if {self.split, self.eval_split} != {"train", "test"}:
                raise ValueError(
                    f"eval_split and split must be test and train (or train and test) for task arith: each split holds its half of the problems, so held-out ones are never trained on; got split={self.split!r}, eval_split={self.eval_split!r}"
                )
            for key, n in (("digits", self.questions), ("eval_digits", self.eval_questions)):
                lo, hi = digit_range(key, value := getattr(self, key) or self.digits)
                if -(-n // (hi - lo + 1)) > (half := (9 * 10 ** (lo - 1)) ** 2 // 2):
                    raise ValueError(
                        f"{key}={value} with {n} questions needs {-(-n // (hi - lo + 1))} {lo}-digit problems, but a split holds only {half} (half the pairs; the other is held out): ask for fewer or raise the digits"
                    )


@dataclass
class StarSection:
    """STaR (``train.method: star``; :mod:`qstar.recipes.star`): ``iterations`` rounds of
    sampling rationales for the ``qa`` questions, keeping the correct ones, *rationalising* the
    wrong ones (``rationalize``: the answer as a hint, dropped from the training text), and
    fine-tuning the *base* model on what was kept for ``steps_per_iteration`` steps, growing by
    ``step_growth`` each iteration (the STaR paper: 1.2). ``train_format``: what a kept
    rationale trains on: ``sampled``, the prompt it was sampled with (the worked examples, the
    question without any hint) followed by the rationale and answer, so the model is fine-tuned
    on the format it generates in; ``zero_shot``, the question alone followed by the rationale
    (the examples dropped; a deviation from sampling, kept as a named option). V-STaR's
    generator runs the same."""

    iterations: int = 3
    rationalize: bool = True
    steps_per_iteration: int = 10
    step_growth: float = 1.2
    train_format: str = "sampled"

    def validate(self) -> None:
        _int_in("iterations", self.iterations, 0, 1 << 20)
        _int_in("steps_per_iteration", self.steps_per_iteration, 1, 1 << 30)
        _float_ge("step_growth", self.step_growth, 1.0)
        _choice("train_format", self.train_format, ("sampled", "zero_shot"))


@dataclass
class TriceSection:
    """TRICE (``train.method: trice``; :mod:`qstar.recipes.trice`): a memory of one correct
    rationale for each of ``qa.questions`` training questions, ``train.steps`` steps of
    ``train.batch_size`` questions. ``control_variate``: the leave-one-out control variate on
    the proposal's score (the paper's); ``false`` drops it (an ablation: the plain estimator)."""

    control_variate: bool = True

    def validate(self) -> None:
        pass


@dataclass
class VStarSection:
    """V-STaR (``train.method: vstar``; :mod:`qstar.recipes.vstar`): STaR's iterations as the
    generator with ``samples`` solutions per question, then a verifier trained from the base
    model with DPO (``dpo_beta``) on (correct, incorrect) pairs of the same question for
    ``verifier_steps`` steps; held-out questions are answered by the best of ``samples``
    solutions by the verifier. ``accumulate``: each iteration fine-tunes the generator on the
    correct solutions of every iteration so far (the paper's), not only its own.
    ``verifier_init``: the verifier starts from the model fine-tuned on the training questions'
    gold solutions for ``sft_steps`` steps (``sft``, the paper's; the DPO reference is that
    model too) or from the base model (``base``)."""

    samples: int = 4
    verifier_steps: int = 10
    dpo_beta: float = 0.1
    accumulate: bool = True
    verifier_init: str = "sft"
    sft_steps: int = 10

    def validate(self) -> None:
        _int_in("samples", self.samples, 1, 1 << 10)
        _int_in("verifier_steps", self.verifier_steps, 0, 1 << 30)
        _float_gt("dpo_beta", self.dpo_beta, 0.0)
        _choice("verifier_init", self.verifier_init, ("sft", "base"))
        _int_in("sft_steps", self.sft_steps, 0, 1 << 30)
