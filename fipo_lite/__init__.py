"""fipo_lite: FIPO (Future-KL Influenced Policy Optimization) on one machine.

The objective is importable from the top: `future_kl`, `policy_loss`, `from_recipe`; so is the
notebook API (`fipo_lite/api.py`), loaded on first use: `train`, `ablate`, `plot`, `evaluate`, `export`, `plan`.
"""

import importlib

from .future_kl import future_kl, future_kl_chunked
from .objective import LOSS_AGG_MODES, MODES, aggregate, from_recipe, influence_bounds, policy_loss

__version__ = "0.1.0"
__all__ = ["future_kl", "future_kl_chunked", "policy_loss", "from_recipe", "influence_bounds", "aggregate", "MODES", "LOSS_AGG_MODES",
           "train", "ablate", "plot", "evaluate", "export", "plan", "Run"]
_API = ("train", "ablate", "plot", "evaluate", "export", "plan", "Run")


def __getattr__(name: str):
    """The notebook API on first use, so `import fipo_lite` stays light (no pandas, matplotlib, transformers)."""
    if name in _API:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fipo_lite' has no attribute '{name}'")
