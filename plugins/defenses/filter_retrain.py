"""Filter, then retrain: any registered data detector as a training-time defense.

The defender trains on the set as supplied, runs a data detector over it (with the plainly trained
model where the detector reads one), drops the rows it flags, and trains a fresh model on the rest
with the profile's schedule: Spectral Signatures' own defense (Tran, Li & Madry, NeurIPS 2018: remove
the 1.5 eps highest-scoring rows, retrain), and the use every poisoned-data detector proposes. The
rows dropped are the detector's decision (its own, else the threshold at the run's false-positive
rate on the clean share), or with ``drop`` > 0 that share of all rows with the highest scores.

``filter-retrain@NAME`` runs the built-in data detector NAME; any registered one (a third party's
included) with ``--set filter-retrain.detector=NAME``.
"""
from dataclasses import dataclass

from nadbench import Source, TrainingDefense, hookimpl, param
from nadbench.toolkit.samples import ranked_share, split
from nadbench.training.train import train


@dataclass(frozen=True)
class FilterRetrainConfig:
    detector: str = param("spectral", "the data detector that decides which rows to drop (bench list detectors)")
    drop: float = param(0.0, "drop this share of all rows with the highest scores (0: the detector's decision)",
                        min=0.0, max=0.9)


class FilterRetrain(TrainingDefense):
    name = "filter-retrain"
    Config = FilterRetrainConfig
    description = "drop the rows a data detector flags, retrain on the rest (spectral by default; @scan, @spectre, ...)"
    uses_clean_data = True  # the engine's threshold, and detectors that compare with clean rows (SCAn)
    sources = (Source(paper="Tran, Li & Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018 "
                            "(remove the flagged rows, retrain)",
                      repo="MadryLab/backdoor_data_poisoning", path="compute_corr.py",
                      commit="c15096fdd79836e3e94a5cab54d50fe97a9c140f"),)
    variant_defaults = {name: {"detector": name} for name in ("ac", "scan", "spectre", "spectral")}

    @property
    def uses_detectors(self):
        return (self.config.detector,)

    def train(self, data, clean, ctx):
        found = ctx.detect(self.config.detector)
        dropped = ranked_share(found.scores, self.config.drop, highest=True) if self.config.drop else found.flagged
        kept, _ = split(data, dropped)
        ctx.log_metric("defense.dropped", float(dropped.sum()), None)
        return train(ctx.build_model(), kept, ctx.schedule, seed=ctx.seed, desc=f"retrain ({self.config.detector})",
                     progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(FilterRetrain)
