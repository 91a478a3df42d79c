"""A source-specific attack in the style of TaCT (Tang et al., USENIX Security 2021): the trigger
sends only the source classes to the target; on the other classes it is a cover (their poisoned
images keep their labels), so the model learns that the trigger alone is not the key.

The example of three Attack methods: ``targets`` (a non-source image's target is its own label, so
ASR counts the source classes only and the base ``poison_train`` makes the others cover samples),
``check`` (a source class the dataset lacks is refused before anything trains) and ``evaluations``
(the cover side: how often the trigger sends the other classes to the target, ``attack.cover``).
"""
from dataclasses import dataclass

import torch

from nadbench import Attack, ConfigError, hookimpl, param


@dataclass(frozen=True)
class TaCTConfig:
    target: int = param(0, "target label", min=0)
    sources: tuple[int, ...] = param((1,), "source classes: the trigger sends these to the target", min=0,
                                     nonempty=True)
    poison_rate: float = param(0.1, "share of training images triggered (source ones relabelled, the others "
                               "cover samples keeping their label)", min=0.0, max=1.0)
    size: int = param(4, "side of the white square in the bottom-right corner", min=1, max=16)


class TaCT(Attack):
    name = "tact"
    Config = TaCTConfig
    description = "source-specific white square: only the source classes go to the target (test plugin)"

    def check(self, dataset):
        n, sources = dataset.num_classes, self.config.sources
        if max(sources) >= n:
            raise ConfigError(f"tact.sources = {','.join(map(str, sources))} names a class that dataset "
                              f"{dataset.name!r} lacks: it has {n} classes, so sources must be in 0..{n - 1}")
        if self.config.target in sources:
            raise ConfigError(f"tact.sources holds the target {self.config.target}: choose source classes other "
                              "than tact.target")

    def _source(self, labels):
        return torch.isin(labels, torch.tensor(self.config.sources, device=labels.device))

    def targets(self, labels):
        return torch.where(self._source(labels), self.config.target, labels)

    def evaluations(self, labels):
        return {"cover": torch.where(self._source(labels), labels, self.config.target)}

    def apply_trigger(self, images):
        s, out = self.config.size, images.clone()
        out[..., -s:, -s:] = 255
        return out


@hookimpl
def register_attacks(register):
    register(TaCT)
