"""Neural Cleanse (Wang et al., S&P 2019): for every class, reverse-engineer the smallest trigger
(mask and pattern) that sends the clean images there (``nadbench.toolkit.adversarial.invert_trigger``); a
class whose trigger is anomalously small (anomaly index > 2 with its L1 norm below the median) is a
backdoor target. The model is then unlearnt: finetuned on the clean subset with 20 % of the images
stamped with a flagged class's inverted trigger, their labels kept. With no class flagged the
model is returned unchanged (BackdoorBench does the same).

Settings of BackdoorBench's ``config/defense/nc/cifar10.yaml`` (read for settings), which follow the
official code (bolunwang/backdoor): Adam lr 0.1 on the mask, initial cost 1e-3, cost multiplier 2,
patience 5, attack success 98 %, early stop after 25 epochs without a 1 % smaller mask, 80 epochs
of inversion per class, batch 256; unlearning 20 % of the clean subset, 100 epochs at lr 0.01
(cosine, SGD momentum 0.9, weight decay 5e-4, crop and flip). The original paper unlearns for one
epoch. ``quick`` runs 10 inversion epochs per class and 10 unlearning epochs to keep a cell short
on a CPU (``time_defense_s`` in ``benchmarks/results/table1-quick-paper-attacks-nc-ibau.json``);
``paper`` keeps BackdoorBench's. On the test fixture's BadNets model, 20 inversion epochs flagged
the target (and one other class) and unlearning removed most of the backdoor; 5 flagged none
(``python benchmarks/defenses_fixture.py``, ``benchmarks/results/defenses-fixture.md``).
Logged: each class's trigger norm and anomaly index
(``nc.l1``, ``nc.anomaly_index``, step = class), the flagged classes (``nc.flagged``) and the
inverted triggers as an image (``defense/nc_triggers.png``).
"""
from dataclasses import dataclass

import torch

from nadbench import Defense, Deviation, Source, Split, hookimpl, param
from nadbench.toolkit.adversarial import anomaly_indices, invert_trigger
from nadbench.training.augment import to_float
from nadbench.engine.figures import triggers_figure
from nadbench.training.train import Optim, train


@dataclass(frozen=True)
class NeuralCleanseConfig:
    epochs: int = param(80, "trigger-inversion epochs per class", min=1, max=10000)
    mask_lr: float = param(0.1, "Adam learning rate of the mask and pattern", min=0.0)
    init_cost: float = param(1e-3, "weight of the mask's L1 norm once the inversion succeeds", min=0.0)
    success: float = param(0.98, "share of images sent to the class that counts as success", min=0.0, max=1.0)
    threshold: float = param(2.0, "anomaly index above which a class is flagged", min=0.0)
    unlearn_share: float = param(0.2, "share of the clean subset stamped with a flagged trigger", min=0.0, max=1.0)
    unlearn_epochs: int = param(100, "unlearning epochs (cosine learning-rate decay)", min=1, max=1000)
    lr: float = param(0.01, "unlearning learning rate", min=0.0, max=10.0)
    batch_size: int = param(256, "batch size of inversion and unlearning", min=1, max=65536)


class NeuralCleanse(Defense):
    name = "neural-cleanse"
    Config = NeuralCleanseConfig
    description = "invert a trigger per class, flag the anomalously small one, unlearn it"
    sources = (Source(paper="Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "
                            "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks, "
                            "S&P 2019",
                      repo="bolunwang/backdoor", path="gtsrb_visualize_example.py",
                      commit="e8577747d4670366a02db3818bf60f978d4c6421",
                      backdoorbench="config/defense/nc/cifar10.yaml"),)
    deviations = (Deviation("mitigation", ours="unlearning, 100 epochs at lr 0.01 cosine",
                            theirs="the paper: unlearning for one epoch, or pruning", bb="unlearning, 100 epochs",
                            why="BackdoorBench's setting, the one compared against"),
                  Deviation("epochs on quick", ours="10 inversion epochs per class, 10 unlearning epochs",
                            theirs="up to 1000 steps per class, early stop", bb="80 inversion epochs, 100 unlearning",
                            why="a cell short enough for a CPU; the paper profile keeps BackdoorBench's"))
    profile_settings = {"epochs": {"quick": 10}, "unlearn_epochs": {"quick": 10}}

    def defend(self, model, clean, ctx):
        cfg = self.config
        images = to_float(clean.images)
        gen = torch.Generator(device=images.device).manual_seed(ctx.seed)
        found = [invert_trigger(model, clean.images, c, seed=ctx.seed * ctx.num_classes + c, epochs=cfg.epochs,
                                batch_size=cfg.batch_size, lr=cfg.mask_lr, init_cost=cfg.init_cost,
                                success=cfg.success, progress=ctx.progress)
                 for c in range(ctx.num_classes)]
        norms = torch.tensor([f["l1"] for f in found])
        index = anomaly_indices(norms)
        flagged = [c for c in range(ctx.num_classes) if index[c] > cfg.threshold and norms[c] < norms.median()]
        for c in range(ctx.num_classes):
            ctx.log_metric("nc.l1", float(norms[c]), c)
            ctx.log_metric("nc.anomaly_index", float(index[c]), c)
        ctx.log_metric("nc.flagged", len(flagged))
        ctx.log_figure(triggers_figure([(f"{c}: {index[c]:.1f}" + (" *" if c in flagged else ""),
                                         (f["mask"] * f["pattern"]).cpu()) for c, f in enumerate(found)],
                                       "inverted triggers (class: anomaly index, * flagged)"), "nc_triggers.png")
        if not flagged:
            return model.eval()
        stamped = clean.images.clone()
        rows = torch.randperm(len(clean), generator=gen, device=gen.device)[:round(cfg.unlearn_share * len(clean))]
        for k, c in enumerate(flagged):  # each flagged class's trigger on its share of the rows
            part = rows[k::len(flagged)].to(images.device)
            m, p = found[c]["mask"], found[c]["pattern"]
            stamped[part] = ((1 - m) * images[part] + m * p).mul(255).round().to(torch.uint8)
        optim = Optim(epochs=cfg.unlearn_epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.9, nesterov=False,
                      weight_decay=5e-4, schedule="cosine", crop=4, flip=True)
        return train(model, Split(stamped, clean.labels), optim, seed=ctx.seed, desc="nc unlearning",
                     progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(NeuralCleanse)
