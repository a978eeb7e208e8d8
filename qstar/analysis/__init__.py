"""Reading experiments: tidy tables, the paper's figures and ``qstar report`` (``report``),
held-out and task evidence with bootstrap intervals (``evidence``, ``stats``), figure set-up
(``plotting``) and the train-step benchmark (``bench``)."""
