"""Training recipes: one per method, each a :class:`~qstar.recipes.base.Recipe` run by the one
loop in :mod:`qstar.recipes.base` over the run layer (:mod:`qstar.runs`), and registered by
name in :mod:`qstar.recipes.registry`. Importing this package registers the built-in methods:
Quiet-STaR and its no-thought baseline (:mod:`~qstar.recipes.quiet_star`), STaR
(:mod:`~qstar.recipes.star`), TRICE (:mod:`~qstar.recipes.trice`) and V-STaR
(:mod:`~qstar.recipes.vstar`). :func:`~qstar.recipes.train.train` runs any of them."""

from qstar.recipes import quiet_star, star, trice, vstar  # noqa: F401  (registers the methods)
