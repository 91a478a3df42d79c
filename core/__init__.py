"""nadbench: a plugin-based benchmark for backdoor attacks and defenses (Neural Attention Distillation).

Plugin authors import everything they need from here; this module stays free of torch so that
the CLI starts fast.
"""
from .api import (TARGET_MODES, Attack, AttackContext, DatasetSpec, Defended, Defense, DefenseContext, ModelSpec,
                  Split)
from .config import ConfigError, param
from .hookspecs import hookimpl
from .sources import Deviation, Source

__version__ = "0.1.0"
__all__ = ["TARGET_MODES", "Attack", "AttackContext", "ConfigError", "DatasetSpec", "Defended", "Defense", "DefenseContext",
           "ModelSpec", "Source", "Deviation", "Split", "hookimpl", "param"]
