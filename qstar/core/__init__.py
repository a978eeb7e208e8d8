"""The method: Quiet-STaR's think -> talk -> learn over any Hugging Face causal LM.

``attention`` (the thought attention layout and its kernels), ``think`` (thought sampling and
the teacher-forced thought block), ``talk`` (the mixing head), ``learn`` (the losses),
``model`` (:class:`QuietStar`, which holds the parameters and assembles one training forward)
and ``hf`` (the only module that touches transformers internals).
"""
