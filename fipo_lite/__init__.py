"""fipo_lite: FIPO (Future-KL Influenced Policy Optimization) on one machine.

The objective is importable from the top: `future_kl`, `policy_loss`, `from_recipe`.
"""

from .future_kl import future_kl, future_kl_chunked
from .objective import LOSS_AGG_MODES, MODES, aggregate, from_recipe, influence_bounds, policy_loss

__version__ = "0.1.0"
__all__ = ["future_kl", "future_kl_chunked", "policy_loss", "from_recipe", "influence_bounds", "aggregate", "MODES", "LOSS_AGG_MODES"]
