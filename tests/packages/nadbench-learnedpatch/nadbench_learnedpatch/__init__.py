"""A third-party attack that controls training and learns its trigger: a corner patch whose colours
are optimised with the classifier (a side network of the step, with its own Adam), the smallest case of
what IAD's generator or LIRA's trigger network do. Used by tests/test_training_attacks.py: the
trigger exists only after training, so a cache hit, a worker or `bench attack` that did not get the
learnt patch back from the store could not trigger the model at all.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nadbench import Attack, hookimpl, param
from nadbench.train import Optim, Step


@dataclass(frozen=True)
class LearnedPatchConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share of training images that carry the patch, relabelled", min=0.0, max=1.0)
    size: int = param(5, "side of the patch in the bottom-right corner", min=1, max=32)
    lr: float = param(0.05, "Adam learning rate of the patch's colours", min=0.0, max=10.0)


class PatchStep(Step):
    """Stamps the current patch on the batch's poisoned rows after augmentation, and takes one step
    of the model's optimiser and one of the patch's (a side network the loop builds and schedules)
    on the same loss."""

    def __init__(self, attack: "LearnedPatch", poisoned: torch.Tensor, n_train: int):
        self.attack = attack
        self.rows = torch.zeros(n_train, dtype=torch.bool, device=poisoned.device)
        self.rows[poisoned] = True
        self.mine = None

    def networks(self, model, data):
        s = self.attack.config.size
        self.logits = nn.Parameter(torch.zeros(3, s, s, device=data.images.device))
        adam = Optim(epochs=self.optim.epochs, lr=self.attack.config.lr, optimizer="adam", weight_decay=0.0)
        return {"patch": (nn.ParameterList([self.logits]), adam)}

    def batch(self, x, y, index, generator):
        self.mine = self.rows[index.to(self.rows.device)]
        return x, y

    def update(self, model, x, y, optimizer):
        s = self.attack.config.size
        x = x.clone()
        x[self.mine, :, -s:, -s:] = torch.sigmoid(self.logits)
        with self.autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        self.optimizers["patch"].zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.optimizers["patch"].step()
        self.attack.pattern = torch.sigmoid(self.logits).detach()
        return loss.detach()


class LearnedPatch(Attack):
    name = "learned-patch"
    Config = LearnedPatchConfig
    description = "a corner patch learnt with the model (test plugin)"
    learns_trigger = True
    pattern: torch.Tensor | None = None  # float (3, size, size) in [0, 1], once learnt

    def poison_images(self, images, labels):
        return images.clone()  # the step stamps the patch while it learns it

    def train_step(self, poisoned, n_train):
        return PatchStep(self, poisoned, n_train)

    def learned_state(self):
        return {"pattern": self.pattern}

    def load_learned_state(self, state):
        self.pattern = state["pattern"]

    def apply_trigger(self, images):
        if self.pattern is None:
            raise RuntimeError("learned-patch: no patch learnt (or loaded) yet")
        s, out = self.config.size, images.clone()
        out[..., -s:, -s:] = (self.pattern.to(images.device) * 255).round().to(torch.uint8)
        return out


@hookimpl
def register_attacks(register):
    register(LearnedPatch)
