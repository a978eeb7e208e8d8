"""qstar: Quiet-STaR (Zelikman et al. 2024) for any Hugging Face causal LM.

think (:mod:`qstar.core.think`, :mod:`qstar.core.attention`) -> talk (:mod:`qstar.core.talk`)
-> learn (:mod:`qstar.core.learn`), assembled in :class:`qstar.QuietStar`. The layers are the
folders; see ARCHITECTURE.md.
"""

from qstar.config import ObjectiveConfig, QuietStarConfig
from qstar.core.learn import StepOutput
from qstar.core.model import QuietStar
from qstar.version import __version__

__all__ = ["ObjectiveConfig", "QuietStar", "QuietStarConfig", "StepOutput", "__version__"]
