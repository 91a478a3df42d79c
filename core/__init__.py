"""nadbench: a plugin-based benchmark for backdoor attacks and defenses (Neural Attention Distillation).

Plugin authors import the contract from here; this module stays free of torch so that the CLI
starts fast. The package's layers, each importing only those below it (``tests/test_layout.py``):

    commands/   the CLI, tables, the practitioner's files (bench attack / bench defend)
    engine/     the registry, the grid, stage keys and the store, the stages, executors, recording
    toolkit/    the methods' building blocks (channels, adversarial, frequency, warping, trigger networks)
    training/   data, the training loop and its steps, evaluation, models, attention
    contract/   what a plugin implements and declares (Attack, Defense, param, hookimpl, Source)

The engine and the toolkit sit side by side: neither imports the other.
"""
from . import moved
from .contract.api import (DETECTOR_LEVELS, TARGET_MODES, Attack, AttackContext, DatasetSpec, Defended, Defense,
                           DefenseContext, Detection, DetectionContext, Detector, ModelSpec, Split,
                           TrainingContext, TrainingDefense)
from .contract.config import ConfigError, param
from .contract.hookspecs import hookimpl
from .contract.sources import Deviation, Source

moved.install()

__version__ = "0.1.0"
__all__ = ["DETECTOR_LEVELS", "Detection", "DetectionContext", "Detector", "TARGET_MODES", "Attack", "AttackContext", "ConfigError", "DatasetSpec", "Defended", "Defense", "DefenseContext",
           "ModelSpec", "Source", "Deviation", "Split", "TrainingContext", "TrainingDefense", "hookimpl", "param"]
