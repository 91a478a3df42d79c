"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the channels clean data leaves
dormant, then finetune.

1. Rank the channels of the model's last features by their mean activation on the clean subset
   (less a held-out slice). The last features are the inputs of the model's declared classifier
   layer: the final feature map after the last normalisation and nonlinearity, globally pooled,
   one input per channel (WRN: the 64 channels after the final BN-ReLU, not the ``block3`` output).
2. Prune them in increasing order, ``step`` channels at a time, and stop before the accuracy on the
   held-out slice *of the defender's clean subset* falls more than ``acc_drop`` below the unpruned
   model's (relative: 0.1 is BackdoorBench's 10% drop; the original paper stops at 4 points on its
   validation data), or at ``max_ratio`` of the channels. Never the test set: BackdoorBench selects
   its ratio on test accuracy, which a defender does not have.
3. Finetune the pruned model on the whole clean subset with the pruned channels kept at zero
   (``finetune=false``: pruning alone).

A pruned channel is an input of the classifier that is always zero, so the pruning is stored as
zero columns of the classifier's weight: the repaired weights load into the plain architecture.
The accuracy-vs-pruned-channels curve is logged as ``prune.acc`` and as a plot.
"""
from dataclasses import dataclass

import torch

from nadbench import ConfigError, Defense, Deviation, Source, hookimpl, param
from nadbench.toolkit.channels import hold_out, largest_within_drop, layer_inputs
from nadbench.engine.figures import line_figure
from nadbench.training.train import FinetuneParams, train


@dataclass(frozen=True)
class FinePruningConfig(FinetuneParams):
    step: int = param(1, "channels pruned per step", min=1)
    acc_drop: float = param(0.1, "stop before held-out accuracy drops by more than this share of its "
                                 "unpruned value (relative)", min=0.0, max=1.0)
    max_ratio: float = param(0.9, "largest share of the channels pruned", min=0.0, max=1.0)
    held_out: float = param(0.1, "share of the clean subset held out to choose the pruning", min=0.0,
                            max=0.5, min_exclusive=True)
    finetune: bool = param(True, "finetune the pruned model on the clean subset")


def pruning_curve(features, labels, classifier, order, step: int, limit: int) -> list[tuple[int, float]]:
    """[(channels pruned, accuracy)] pruning ``order`` ``step`` at a time up to ``limit`` channels.
    Exact and cheap: with the classifier linear, pruning only zeroes its inputs."""
    mask = torch.ones(features.shape[1], device=features.device)
    curve = []
    for k in range(0, limit + 1, step):
        mask[order[:k]] = 0
        with torch.inference_mode():
            pred = classifier(features * mask).argmax(1)
        curve.append((k, float((pred == labels).float().mean())))
    return curve


class FinePruning(Defense):
    name = "fine-pruning"
    Config = FinePruningConfig
    description = "prune the last features' dormant channels (held-out clean accuracy), then finetune"
    sources = (Source(paper="Liu, Dolan-Gavitt & Garg, "
                            "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks, "
                            "RAID 2018",
                      repo="kangliucn/Fine-pruning-defense", path="face/conv_output_prune.py",
                      commit="4f181c1d9dddae59b6d2e4067f034287cd6f581d",
                      backdoorbench="config/defense/fp/cifar10.yaml"),)
    deviations = (Deviation("stopping rule", ours="held-out slice of the clean subset, 10 % relative ACC drop",
                            theirs="4 points on validation data", bb="10 % relative drop of test ACC",
                            why="a defender has no test set"),)
    # Its finetuning: the quick profile's lower finetuning lr (core/engine/grid.py).
    profile_settings = {"lr": "finetune_lr"}
    uses_classifier = True

    def defend(self, model, clean, ctx):
        cfg = self.config
        if not ctx.classifier_layer:
            raise ConfigError(f"fine-pruning prunes the inputs of the model's classifier layer, and {ctx.student!r} "
                              "declares none: set classifier_layer in its ModelSpec")
        classifier = model.get_submodule(ctx.classifier_layer)
        held, rest = hold_out(clean, cfg.held_out, ctx.seed)

        ranking = layer_inputs(model, classifier, rest.images).mean(0).argsort()  # most dormant first
        features = layer_inputs(model, classifier, held.images)
        n_channels = features.shape[1]
        curve = pruning_curve(features, held.labels, classifier, ranking, cfg.step, int(cfg.max_ratio * n_channels))
        pruned = largest_within_drop(curve, cfg.acc_drop)
        for k, acc in curve:
            ctx.log_metric("prune.acc", acc, k)
        ctx.log_metric("prune.channels", pruned)
        ctx.log_metric("prune.ratio", pruned / n_channels)
        ctx.log_figure(line_figure(
            [k for k, _ in curve], {"held-out clean ACC": [100 * a for _, a in curve]},
            "channels pruned (most dormant first)", "%", vline=(pruned, f"pruned: {pruned} of {n_channels}"),
            hline=(100 * (1 - cfg.acc_drop) * curve[0][1], f"{cfg.acc_drop:.0%} relative drop")), "pruning.png")

        mask = torch.ones(n_channels, device=features.device)
        mask[ranking[:pruned]] = 0
        with torch.no_grad():
            classifier.weight.mul_(mask)
        if cfg.finetune:  # the pruned inputs stay zero, so their weight columns get no gradient
            hook = classifier.register_forward_pre_hook(lambda module, args: (args[0] * mask.to(args[0].dtype),))
            try:
                train(model, clean, cfg.optim(), seed=ctx.seed, desc="fine-pruning finetune", progress=ctx.progress,
                      on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))
            finally:
                hook.remove()
            with torch.no_grad():
                classifier.weight.mul_(mask)  # exact zeros, whatever the optimiser did
        return model.eval()


@hookimpl
def register_defenses(register):
    register(FinePruning)
