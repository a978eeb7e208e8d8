"""The run layer under every recipe: the run directory and its files, atomic checkpoints with
recipe-owned state, tracking, several processes, optimisation diagnostics and which parameters
train. Recipes (:mod:`qstar.recipes`) build on it; evaluation, experiments and analysis read
what it writes."""
