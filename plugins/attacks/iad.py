"""IAD, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator gives each image
its own pattern and a mask network its own mask, x' = x + (pattern(x) - x) * mask(x). Both are learnt
while the classifier trains (``learns_trigger``), by this attack's step; its networks stay on the attack.

Official code: VinAIResearch/input-aware-backdoor-attack-release (``train.py``, ``config.py``,
``networks/models.py``), read for its settings; the networks (official CIFAR-10 architecture) are
``nadbench.toolkit.iad_networks``. Defaults as there: target 0, all-to-one (official default; all2all: y -> y + 1
mod C), per batch 10 % backdoor samples (own trigger, target label) and 10 % cross samples (another
image's pattern and mask, label kept), diversity weight 1, mask norm weight 100 above density 0.032,
Adam (betas 0.5, 0.9) at lr 0.01 for both networks. The mask network trains first, alone (norm +
diversity loss), then is frozen (eval mode) while classifier and generator train on CE + diversity.
The poison stage changes no image or label (empty index: ``n_poisoned`` 0); the step makes each
batch's samples after augmentation, as the official loader augments before the generator. Inputs are
float [0, 1] images, not normalised ones: the blend is the same, and the classifier normalises itself.

Where we differ, and why: officially 25 mask epochs (lr /10 at 10, 20), then joint training to epoch
600 (classifier lr /10 at joint epochs 100, ..., 400, generator at 200, ..., 500). Here the first
max(1, round(mask_epochs_share x epochs)) epochs (at most all but one) train the mask network alone
(lr /10 at 40 % and 80 % of them): 0.25 gives the paper profile's 100 epochs the official 25, the
quick profile's 10 epochs 2 mask + 8 joint. The classifier runs the profile's whole schedule compressed
into the joint epochs (a onecycle warm-up is not spent on mask epochs); the generator's lr follows in
proportion. A cross sample's other image is a random clean row of its batch (official: a second
loader); mask training pairs each image with the next of the shuffled batch. lambda_div weighs the mask
loss's diversity term once (officially twice: the same at the default 1). ``width`` 32 is the official
network; 16 makes a training step markedly cheaper. The quick profile sets ``p_attack`` 0.2
(``profile_settings``; the paper profile keeps the official 0.1): with 0.1 its 10 epochs implanted
the backdoor only partly (benchmarks/results/table1-quick-iad-ssba.md), where the official schedule
has 600.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from nadbench import TARGET_MODES, Attack, Deviation, Source, Split, hookimpl, param
from nadbench.toolkit.iad_networks import EPSILON, IADGenerator, MaskGenerator
from nadbench.training.train import Optim, Step


@dataclass(frozen=True)
class IADConfig:
    target: int = param(0, "target label (all2one)", min=0)
    target_mode: str = param("all2one", "all2one, or all2all: y -> (y + 1) mod C", choices=TARGET_MODES)
    p_attack: float = param(0.1, "share of each batch given its own trigger and target label", min=0.0, max=0.5)
    p_cross: float = param(0.1, "share of each batch given another image's trigger, label kept", min=0.0, max=0.5)
    lambda_div: float = param(1.0, "weight of the diversity loss", min=0.0)
    lambda_norm: float = param(100.0, "weight of the mask norm loss", min=0.0)
    mask_density: float = param(0.032, "mask density above which the norm loss penalises", min=0.0, max=1.0)
    lr_G: float = param(0.01, "Adam lr of the generator (betas 0.5, 0.9)", min=0.0, max=10.0)
    lr_M: float = param(0.01, "Adam lr of the mask network (betas 0.5, 0.9)", min=0.0, max=10.0)
    mask_epochs_share: float = param(0.25, "share of the epochs that train only the mask network (>= 1 epoch)",
                                     min=0.0, max=1.0)
    width: int = param(32, "channels of the networks' first level (official 32; doubling per level)", min=1, max=256)
    zero_generator_grads: bool = param(True, "zero the generator's gradients every step (False: as the official "
                                             "code, which never does: each step follows the sum of all so far)")


def diversity(x1, x2, t1, t2) -> torch.Tensor:
    """The official diversity loss: mean RMS distance of the images over that of their triggers
    (patterns or masks); low when different images get different triggers. Zero distances get no
    gradient (instead of NaN)."""
    def rms(a, b):
        return (a - b).pow(2).mean((1, 2, 3)).clamp_min(1e-12).sqrt()
    return (rms(x1, x2) / (rms(t1, t2) + EPSILON)).mean() if len(x1) else x1.new_zeros(())


def _step(loss: torch.Tensor, *optimizers, accumulating=()) -> torch.Tensor:
    """One update of ``optimizers``; those in ``accumulating`` keep their gradients from step to step."""
    for optimizer in optimizers:
        if optimizer not in accumulating:
            optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return loss.detach()


class IADStep(Step):
    """Mask epochs, then joint epochs (see the module docstring); trains fresh networks of the attack."""

    def __init__(self, attack: "IAD"):
        self.attack = attack

    def mask_epochs(self, epochs: int) -> int:
        share = self.attack.config.mask_epochs_share
        return min(max(1, round(share * epochs)) if share > 0 else 0, epochs - 1)

    def schedule(self, optim):
        self.m = self.mask_epochs(optim.epochs)
        return replace(optim, start=self.m)  # the classifier's whole schedule in the joint epochs

    def networks(self, model, data):
        c, m = self.attack.config, self.m
        self.G, self.M = self.attack.build(data.images.shape[1], data.images.device, c.width)
        adam = dict(optimizer="adam", betas=(0.5, 0.9), weight_decay=0.0)
        return {"generator": (self.G, replace(self.optim, lr=c.lr_G, **adam)),  # in proportion to the classifier
                "mask": (self.M, Optim(epochs=m, lr=c.lr_M, schedule="step", milestones=(0.4 * m, 0.8 * m), **adam))}

    def batch(self, x, y, index, generator):
        c = self.attack.config
        if self.t < self.m:
            return x, y
        nb, nc = int(c.p_attack * len(y)), int(c.p_cross * len(y))
        rest = torch.randperm(len(y) - nb - nc, device=x.device, generator=generator)
        others = nb + nc + rest[:max(nb, nc)]  # clean rows whose triggers the cross rows take
        self.plan = nb, min(nc, len(others)), others
        y = y.clone()
        y[:nb] = self.attack.targets(y[:nb])
        return x, y

    def update(self, model, x, y, optimizer):
        c = self.attack.config
        if self.t < self.m:  # mask network only
            self.M.train()
            with self.autocast():
                masks = self.M(x).float()
            loss = (c.lambda_norm * F.relu(masks - c.mask_density).mean()
                    + c.lambda_div * diversity(x, x.roll(1, 0), masks, masks.roll(1, 0)))
            return _step(loss, self.optimizers["mask"])
        self.M.eval().requires_grad_(False)
        self.G.train()
        nb, nc, others = self.plan
        src = torch.cat([x[:nb], x[others]])  # the backdoor rows, then the others
        with self.autocast():
            with torch.no_grad():
                masks = self.M(src).float()
            patterns = self.G(src).float()
        k, d = nb + nc, min(nb, len(others))
        triggered = x[:k] + (patterns[:k] - x[:k]) * masks[:k]  # own trigger, then the others'
        with self.autocast():
            ce = F.cross_entropy(model(torch.cat([triggered, x[k:]])), y)
        loss = ce + c.lambda_div * diversity(x[:d], x[others[:d]], patterns[:d], patterns[nb:nb + d])
        gen = self.optimizers["generator"]
        _step(loss, optimizer, gen, accumulating=() if c.zero_generator_grads else (gen,))
        return ce.detach()


class IAD(Attack):
    name = "iad"
    Config = IADConfig
    description = "input-aware dynamic trigger: generator and mask network learnt with the model"
    sources = (Source(paper="Nguyen & Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020",
                      repo="VinAIResearch/input-aware-backdoor-attack-release", path="config.py",
                      commit="1750e4ff0cc2371b243f1fd0ee18971f7e49fe78",
                      backdoorbench="config/attack/inputaware/default.yaml"),)
    deviations = (Deviation("schedule", ours="mask_epochs_share of the profile's epochs for the mask, then joint",
                            theirs="25 mask epochs, then joint training to epoch 600", bb="25 mask epochs, then joint",
                            why="one schedule for every attack of a grid, compressed in proportion"),
                  Deviation("cross samples", ours="another clean row of the batch", theirs="a second loader",
                            why="the same distribution without a second pass over the data"),
                  Deviation("generator gradients", ours="zeroed every step",
                            theirs="never zeroed: they sum over every step of the run (train.py zeroes only "
                                   "the classifier's)", bb="never zeroed (attack/inputaware.py, as theirs)",
                            why="the paper trains generator and classifier jointly by gradient descent on each "
                                "batch's loss; a running sum of all past gradients is a missing zero_grad, not a "
                                "method (zero_generator_grads=false reproduces it)"),
                  Deviation("p_attack on quick", ours="0.2 (paper profile 0.1)", theirs="0.1", bb="0.1",
                            why="0.1 implants it only partly in the quick profile's 10 epochs "
                                "(benchmarks/results/table1-quick-iad-ssba.md)"))
    learns_trigger = True
    profile_settings = {"p_attack": {"quick": 0.2}}  # see the docstring: 10 epochs, not 600
    generator: IADGenerator | None = None
    mask_net: MaskGenerator | None = None

    def build(self, channels: int, device, width: int = 32) -> tuple[IADGenerator, MaskGenerator]:
        """Fresh (randomly initialised) networks, kept on the attack."""
        self.generator = IADGenerator(channels, width=width).to(device)
        self.mask_net = MaskGenerator(channels, width=width).to(device)
        return self.generator, self.mask_net

    def poison_images(self, images, labels):
        return images.clone()  # the step makes the backdoor samples, per batch

    def poison_train(self, train, generator):
        """Nothing changes before training: the same images and labels, an empty index."""
        return Split(train.images.clone(), train.labels.clone()), train.labels.new_zeros(0)

    def train_step(self, poisoned, n_train):
        return IADStep(self)

    def learned_state(self):
        nets = {"generator.": self.generator, "mask.": self.mask_net} if self.generator is not None else {}
        return {prefix + k: v.detach().clone() for prefix, net in nets.items() for k, v in net.state_dict().items()}

    def load_learned_state(self, state):
        def part(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        generator, mask = part("generator."), part("mask.")
        first = generator["convblock_down_0.conv2d.weight"]
        self.build(first.shape[1], first.device, width=first.shape[0])
        self.generator.load_state_dict(generator)
        self.mask_net.load_state_dict(mask)

    def trigger(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Float [0, 1] images with their own trigger, or with that of ``source`` (a cross sample)."""
        if self.generator is None:
            raise RuntimeError("iad: no generator learnt (or loaded) yet")
        source = x if source is None else source
        self.generator.eval(), self.mask_net.eval()
        with torch.no_grad():
            return x + (self.generator(source) - x) * self.mask_net(source)

    def apply_trigger(self, images):
        device = next(self.generator.parameters()).device if self.generator is not None else images.device
        out = [(self.trigger(chunk.to(device).float() / 255) * 255).round_().clamp_(0, 255).to(torch.uint8)
               for chunk in images.split(1024)]
        return torch.cat(out).to(images.device) if out else images.clone()


@hookimpl
def register_attacks(register):
    register(IAD)
