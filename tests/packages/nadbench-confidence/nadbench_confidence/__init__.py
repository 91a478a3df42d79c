"""A third-party input detector, as small as one can be: a backdoored model tends to be more
confident on triggered inputs than on clean ones, so the score is the top softmax probability
(sharpened by a temperature). It only scores: the engine flags inputs at the grid's false-positive
rate on the clean share."""
from dataclasses import dataclass

from nadbench import Detector, hookimpl, param
from nadbench.toolkit.features import logits


@dataclass(frozen=True)
class ConfidenceConfig:
    temperature: float = param(1.0, "softmax temperature", min=0.0, min_exclusive=True)


class Confidence(Detector):
    name = "confidence"
    Config = ConfidenceConfig
    level = "input"
    description = "input level: the model's top softmax probability"

    def score(self, model, images):
        return (logits(model, images) / self.config.temperature).softmax(1).max(1).values


@hookimpl
def register_detectors(register):
    register(Confidence)
