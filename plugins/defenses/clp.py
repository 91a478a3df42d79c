"""Channel Lipschitzness-based pruning, CLP (Zheng et al., ECCV 2022): data-free.

A backdoor needs channels that respond strongly to a small input pattern: channels with a large
upper bound on their Lipschitz constant. For every batch norm that normalises one convolution's
output, channel k's bound is ``|gamma_k / sigma_k| * ||W_k||_2`` (``nadbench.toolkit.channels``); within each
layer, the channels above ``mean + u * std`` of the layer's bounds are pruned (their BN weight and
bias zeroed). No data is read: the engine hands a data-free defense an empty clean split, and
`bench defend --defense clp` runs without ``--clean``.

Settings: u = 3, the official code's default for CIFAR-10 (rkteddy/channel-Lipschitzness-based-pruning,
``defense.py``); it is the same in every profile (no training, nothing to shorten).
Where we differ: the official code pairs each BN with the convolution before it *in module order*;
here pairs come from the graph (``conv_bn_pairs``), so in pre-activation networks the BNs after a
residual sum are not pruned (see ``nadbench.toolkit.channels``). The number of channels pruned per layer
is logged (``clp.pruned``, step = the layer's position) with the total (``clp.pruned_total``).
"""
from dataclasses import dataclass

import torch

from nadbench import Defense, Deviation, Source, hookimpl, param
from nadbench.toolkit.channels import channel_lipschitz, conv_bn_pairs, prune_bn


@dataclass(frozen=True)
class CLPConfig:
    u: float = param(3.0, "prune channels whose Lipschitz bound exceeds the layer's mean + u x std", min=0.0)


class CLP(Defense):
    name = "clp"
    Config = CLPConfig
    description = "data-free: prune channels with an outlying Lipschitz upper bound (u = 3)"
    sources = (Source(paper="Zheng, Tang, Li & Liu, "
                            "Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022",
                      repo="rkteddy/channel-Lipschitzness-based-pruning", path="defense.py",
                      commit="5209c837abfe1c40b0ce3d2971f9f83c172955fd",
                      backdoorbench="config/defense/clp/cifar10.yaml"),)
    deviations = (Deviation("conv-BN pairs", ours="from the model's graph", theirs="in module order",
                            why="in pre-activation networks module order pairs a BN with the wrong conv"),)
    uses_clean_data = False

    def defend(self, model, clean, ctx):
        modules = dict(model.named_modules())
        pruned = {}
        for pair in conv_bn_pairs(model):
            lips = channel_lipschitz(modules[pair.conv], modules[pair.bn])
            pruned[pair.bn] = (lips > lips.mean() + self.config.u * lips.std()).nonzero().flatten()
        prune_bn(model, pruned)
        for i, idx in enumerate(pruned.values()):
            ctx.log_metric("clp.pruned", len(idx), i)
        ctx.log_metric("clp.pruned_total", sum(len(idx) for idx in pruned.values()))
        return model.eval()


@hookimpl
def register_defenses(register):
    register(CLP)
