"""qstar: Quiet-STaR (Zelikman et al. 2024) for any Hugging Face causal LM.

think (:mod:`qstar.think`, :mod:`qstar.attention`) -> talk (:mod:`qstar.talk`) ->
learn (:mod:`qstar.learn`), assembled in :class:`qstar.QuietStar`.
"""

from .config import QuietStarConfig
from .model import QuietStar, QuietStarOutput

__all__ = ["QuietStar", "QuietStarConfig", "QuietStarOutput"]
__version__ = "0.1.0"
