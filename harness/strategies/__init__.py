"""Strategy kinds, one spec each (harness/strategies/spec.py): reference, static TP x PP, DCP, FA Pool."""
from harness.strategies.spec import (FAMILIES, SPECS, StrategyConfig, StrategySpec, family_of, load_plugins,
                                     plugin_modules, register, spec_of)
from harness.strategies import dcp, fa_pool, reference, static  # noqa: E402,F401  (each registers its kind)

__all__ = ["FAMILIES", "SPECS", "StrategyConfig", "StrategySpec", "family_of", "load_plugins", "plugin_modules",
           "register", "spec_of"]
