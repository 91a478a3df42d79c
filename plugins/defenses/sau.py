"""Shared adversarial unlearning, SAU (Wei et al., NeurIPS 2023): a backdoor trigger is an adversarial
perturbation that the backdoored model and a repaired one would share. Each step finds, per clean
image, a perturbation that fools both the model being repaired and the frozen original into the
same wrong label (``nadbench.toolkit.adversarial.shared_adversarial``), then updates the model so that it
keeps its clean predictions and does not give such examples the label the original gives them.

The outer loss per batch (``SAUStep``): ``lmd_1 * CE(x) + lmd_2 * CE(x + delta) + lmd_3 * L_shared``,
L_shared the mean over the batch of ``-log(1 - p(y_ref | x + delta))`` on the images where the original
model's label of ``x + delta`` is neither the true one nor its own clean prediction (p the repaired
model's softmax; probabilities under 0.001 give no gradient, as there). Adam, on the loop.

Settings of the authors' implementation (BackdoorBench ``defense/sau.py``, ``config/defense/sau/
config.yaml``; read for settings only): L-inf bound 0.2 in [0, 1] pixels, 5 PGD steps of 0.2 from
+0.2, beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, Adam lr 1e-4 (its cosine scheduler is built
but never stepped: the lr is constant, as here), batch 256, no augmentation, both models in eval
mode throughout (``train_mode`` off), 100 rounds (epochs) on 5 % of the training set. ``quick``
runs 5 rounds to keep a cell short on a CPU (``time_defense_s`` in
``benchmarks/results/table1-quick-paper-attacks-sau-rnp.json``); ``paper`` keeps 100. The
authors' loss averages two algebraically equal forms of L_shared for numerical reasons; here it is
computed once, from the softmax in float32.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nadbench import Defense, Deviation, Source, hookimpl, param
from nadbench.toolkit.adversarial import eval_mode, shared_adversarial
from nadbench.training.train import Optim, Step, train


@dataclass(frozen=True)
class SAUConfig:
    rounds: int = param(100, "unlearning rounds (passes over the clean subset)", min=1)
    lr: float = param(1e-4, "Adam learning rate of the model", min=0.0, max=10.0)
    batch_size: int = param(256, "batch size", min=1, max=65536)
    eps: float = param(0.2, "L-inf bound of the shared perturbations (in [0, 1] pixels)", min=0.0)
    pgd_step: float = param(0.2, "PGD step size", min=0.0)
    pgd_steps: int = param(5, "PGD steps", min=1, max=1000)
    beta_1: float = param(0.01, "weight of the adversarial term in the maximisation", min=0.0)
    beta_2: float = param(1.0, "weight of the shared (agreement) term in the maximisation", min=0.0)
    lmd_1: float = param(1.0, "weight of the clean cross-entropy", min=0.0)
    lmd_2: float = param(0.0, "weight of the adversarial-training cross-entropy", min=0.0)
    lmd_3: float = param(1.0, "weight of the shared adversarial risk", min=0.0)


class SAUStep(Step):
    """Per batch: shared adversarial examples against the model and the frozen ``reference``; the
    outer loss on them (the loop steps the model's Adam)."""

    def __init__(self, reference, cfg: SAUConfig):
        self.reference, self.cfg = reference, cfg

    def loss(self, model, x, y):
        cfg = self.cfg
        with eval_mode(model):
            delta = shared_adversarial(model, self.reference, x, y, eps=cfg.eps, step=cfg.pgd_step,
                                       steps=cfg.pgd_steps, beta_adv=cfg.beta_1, beta_shared=cfg.beta_2)
            with torch.no_grad():
                ref_clean, ref_adv = self.reference(torch.cat([x, x + delta])).argmax(1).chunk(2)
            logits, adv_logits = model(torch.cat([x, x + delta])).float().chunk(2)
        suspect = (ref_adv != y) & (ref_adv != ref_clean)
        p_shared = adv_logits.softmax(1).gather(1, ref_adv[:, None]).squeeze(1)
        shared = -(torch.log(1 + 1e-6 - p_shared.clamp(min=0.001)) * suspect).sum() / len(y)
        return cfg.lmd_1 * F.cross_entropy(logits, y) + cfg.lmd_2 * F.cross_entropy(adv_logits, y) + cfg.lmd_3 * shared


class SAU(Defense):
    name = "sau"
    Config = SAUConfig
    description = "unlearn the adversarial examples the model shares with the backdoored original"
    sources = (Source(paper="Wei, Zhang, Zha & Wu, "
                            "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial "
                            "Examples, "
                            "NeurIPS 2023",
                      repo="SCLBD/BackdoorBench", path="defense/sau.py",
                      commit="f02e3534645f0ee63d6848653062cd6c0d6c400d",
                      backdoorbench="config/defense/sau/cifar10.yaml"),)
    deviations = (Deviation("rounds", ours="100 (paper profile), 5 on quick", theirs="100", bb="100",
                            why="a cell short enough for a CPU"),
                  Deviation("L_shared", ours="computed once from the float32 softmax",
                            theirs="the mean of two algebraically equal forms", bb="the same as the authors'",
                            why="the same value; one form suffices in float32"))
    profile_settings = {"rounds": {"quick": 5}}

    def defend(self, model, clean, ctx):
        cfg = self.config
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        optim = Optim(epochs=cfg.rounds, lr=cfg.lr, batch_size=cfg.batch_size, optimizer="adam", weight_decay=0.0)
        return train(model, clean, optim, seed=ctx.seed, step=SAUStep(reference, cfg), desc="sau",
                     progress=ctx.progress, on_epoch=lambda e, loss: ctx.log_metric("defense.loss", loss, e))


@hookimpl
def register_defenses(register):
    register(SAU)
