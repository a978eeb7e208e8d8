"""Training recipes and what they share: the Quiet-STaR / plain-LM recipe (``train``),
atomic checkpoints (``checkpoint``), metrics and provenance (``tracking``), several processes
(``distributed``) and optimisation diagnostics (``diagnostics``)."""
