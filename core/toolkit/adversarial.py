"""Input-space optimisation against a fixed model: the project's one PGD (targeted or not, L-inf or
L2), neuron-driven triggers, targeted DeepFool and universal perturbations, Neural Cleanse's
trigger inversion, and adversarial examples shared by two models (SAU).

Everything here works on float images in [0, 1] (the input space of every nadbench model, see
:class:`nadbench.training.models.Normalized`), runs the model in eval mode, and takes gradients with
respect to the input only (``torch.autograd.grad``): the model's parameters get no ``.grad`` and
their ``requires_grad`` flags are left as they were.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..contract.api import Split
from ..training.train import Optim, Step, train


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) noise drawn on the generator's device (CPU draws are the same on every device)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float = 8 / 255,
        step: float = 1.5 / 255, steps: int = 100, batch_size: int = 256,
        generator: torch.Generator | None = None, progress: bool = False, *,
        targets: torch.Tensor | None = None, norm: str = "linf") -> torch.Tensor:
    """PGD (Madry et al.): by default untargeted L-inf, maximising the cross-entropy of the true labels.

    ``images`` are float in [0, 1] (N, C, H, W). Each batch starts at a uniform random point of the
    eps-ball, takes ``steps`` steps of size ``step``, and after every step is projected back onto the
    ball and clamped to [0, 1]. ``targets`` (N,): a targeted attack, minimising the cross-entropy of
    those labels instead. ``norm="l2"``: the ball is L2 (per image, radius ``eps``), the start a
    random point of it, and each step ``step`` along the L2-normalised gradient (L-inf: its sign).
    Returns the perturbed images (a new tensor).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"pgd(norm={norm!r}): valid: linf, l2")
    out = torch.empty_like(images)
    starts = range(0, len(images), batch_size)
    sign = -1.0 if targets is not None else 1.0  # descend the target's loss, ascend the label's
    with eval_mode(model):
        for start in tqdm(starts, desc="PGD", unit="batch", disable=not progress, leave=False):
            x0 = images[start:start + batch_size]
            y = (targets if targets is not None else labels)[start:start + batch_size].to(x0.device)
            if norm == "linf":
                lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
                x = (x0 + (2 * _uniform(x0.shape, generator, x0.device) - 1) * eps).clamp(lo, hi)
            else:
                x = _project_l2(x0, x0 + (2 * _uniform(x0.shape, generator, x0.device) - 1) * eps, eps)
            for _ in range(steps):
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
                if norm == "linf":
                    x = (x.detach() + sign * step * grad.sign()).clamp(lo, hi)
                else:
                    unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    x = _project_l2(x0, x.detach() + sign * step * unit, eps)
            out[start:start + batch_size] = x.detach()
    return out


def _project_l2(x0: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` moved onto the per-image L2 ball of radius ``eps`` around ``x0``, then clamped to [0, 1]."""
    delta = x - x0
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x0 + delta * (eps / norms.clamp_min(eps))).clamp(0, 1)


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (the classifier of the usual CNNs)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to select neurons from")
    return linears[-1]


def most_connected_inputs(layer: nn.Linear, k: int) -> torch.Tensor:
    """Indices of the ``k`` inputs of ``layer`` with the largest summed |weight| into its outputs."""
    if not 1 <= k <= layer.in_features:
        raise ValueError(f"cannot select {k} neurons: the layer has {layer.in_features} inputs")
    return layer.weight.detach().abs().sum(0).topk(k).indices


def input_activations(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives as its (first) input when ``model`` runs on ``x``."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def stamp_added(background: torch.Tensor, trigger: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float images with ``trigger`` added inside ``mask`` and the sum clipped to [0, 1]."""
    return (background + mask * trigger).clamp(0, 1)


def neuron_trigger(model: nn.Module, layer: nn.Module, neurons: Sequence[int] | torch.Tensor,
                   background: torch.Tensor, mask: torch.Tensor, init: torch.Tensor,
                   target: float = 100.0, steps: int = 500, step: float = 2 / 255,
                   progress: bool = False) -> torch.Tensor:
    """Trojan-style trigger generation (Liu et al., NDSS 2018).

    Optimises the trigger pixels inside ``mask`` so that the chosen ``neurons`` of the input of
    ``layer`` reach ``target``: loss = sum over the images and neurons of (a - target)^2, minimised
    by sign-gradient steps of size ``step``, the trigger kept in [0, 1]. The trigger is *added* to
    ``background`` (float (B, C, H, W) in [0, 1]: clean images, or zeros for the trigger alone) and
    the sum clipped, exactly as it is applied later. ``mask`` is (1 or C, H, W) of 0/1 and ``init``
    (C, H, W) the starting trigger. Returns the float trigger (C, H, W), zero outside the mask.
    """
    neurons = torch.as_tensor(neurons, device=background.device)
    t = (init * mask).clamp(0, 1)
    with eval_mode(model):
        for _ in tqdm(range(steps), desc="trigger", disable=not progress, leave=False):
            t.requires_grad_(True)
            acts = input_activations(model, layer, stamp_added(background, t, mask))
            loss = ((acts[..., neurons] - target) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, t)
            t = ((t.detach() - step * grad.sign()) * mask).clamp(0, 1)
    return t.detach()


def targeted_deepfool(model: nn.Module, x: torch.Tensor, target: int, overshoot: float = 0.02,
                      max_iter: int = 200) -> tuple[torch.Tensor, bool]:
    """Targeted DeepFool (Moosavi-Dezfooli et al., CVPR 2016) on one float image (1, C, H, W): the
    smallest L2 step, linearised, that moves the prediction from its class at ``x`` to ``target``.
    Returns the perturbation (scaled by 1 + ``overshoot``) and whether the target was reached within
    ``max_iter`` steps. The model must be in eval mode."""
    total, source = torch.zeros_like(x), None
    for i in range(max_iter + 1):  # one forward pass per step: its prediction, then its gradient
        xi = (x + (1 + overshoot) * total).requires_grad_(True)
        logits = model(xi)
        pred = int(logits.argmax(1))
        source = pred if source is None else source
        if pred == target:
            return (1 + overshoot) * total, True
        if i == max_iter:
            break
        gap = logits[0, target] - logits[0, source]
        (w,) = torch.autograd.grad(gap, xi)
        norm = w.norm().clamp_min(1e-12)
        total = total + (gap.detach().abs() / norm) * w / norm
    return (1 + overshoot) * total, False


def smooth_universal_perturbation(model: nn.Module, images: torch.Tensor, target: int,
                                  smooth, scale: float = 0.2, fooling_rate: float = 0.2,
                                  max_passes: int = 50, overshoot: float = 0.02, max_iter: int = 200,
                                  generator: torch.Generator | None = None,
                                  progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """A universal perturbation kept in a low-frequency band (Zeng et al., ICCV 2021, "smooth trigger").

    Universal adversarial perturbation (Moosavi-Dezfooli et al., CVPR 2017) with a low-pass filter:
    in each pass over ``images`` (float (N, C, H, W) in [0, 1], shuffled by ``generator``), every image
    that ``v`` leaves on its own prediction contributes a targeted DeepFool step, and
    ``v <- rescale(smooth(v + smooth(step)))``, where rescale maps ``v`` onto [0, ``scale``] (min to 0,
    max to ``scale``). Passes stop once ``v`` changes the prediction of at least ``fooling_rate`` of
    the images, when the last five rates lie within 0.01 of each other, or after ``max_passes``.
    Returns the perturbation with the highest fooling rate (C, H, W) and each pass's rate."""
    v = torch.zeros_like(images[:1])
    best, best_rate, rates = v[0], -1.0, []
    with eval_mode(model), torch.no_grad():
        clean_pred = model(images).argmax(1)
    with eval_mode(model):
        for _ in tqdm(range(max_passes), desc="LF trigger", unit="pass", disable=not progress, leave=False):
            for i in torch.randperm(len(images), generator=generator).tolist():
                x = images[i:i + 1]
                with torch.no_grad():
                    moved = int(model((x + v).clamp(0, 1)).argmax(1)) != int(clean_pred[i])
                if moved:
                    continue
                step, reached = targeted_deepfool(model, (x + v).clamp(0, 1), target, overshoot, max_iter)
                if reached and step.abs().sum() > 0:
                    v = smooth(smooth(step) + v)
                    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12) * scale
            with torch.no_grad():
                rate = float((model((images + v).clamp(0, 1)).argmax(1) != clean_pred).float().mean())
            rates.append(rate)
            if rate > best_rate:
                best, best_rate = v[0].clone(), rate
            if rate >= fooling_rate or (len(rates) >= 5 and max(rates[-5:]) - min(rates[-5:]) < 0.01):
                break
    return best, rates


class TriggerInversion(nn.Module):
    """Neural Cleanse's trigger: a mask m (H, W) and a pattern p (C, H, W), both in [0, 1] through a
    tanh, stamped on float images as ``(1 - m) x + m p``; drawn uniformly at random from ``generator``."""

    EPS = 1e-7

    def __init__(self, shape: Sequence[int], generator: torch.Generator, device):
        super().__init__()
        start = lambda size: torch.atanh((_uniform(size, generator, device) - 0.5) * (2 - self.EPS))  # noqa: E731
        self.mask_t = nn.Parameter(start(tuple(shape[1:])))
        self.pattern_t = nn.Parameter(start(tuple(shape)))

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_t) / (2 - self.EPS) + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_t) / (2 - self.EPS) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        return (1 - m) * x + m * self.pattern()


class InversionStep(Step):
    """Per batch, cross-entropy of the stamped images to the target + cost * |m|_1; after each
    epoch, the cost's schedule, the best (smallest successful) trigger and the early stop (see
    :func:`invert_trigger`)."""

    def __init__(self, model: nn.Module, success: float, init_cost: float, patience: int, multiplier: float,
                 early_stop_patience: int):
        self.model, self.success, self.init_cost = model, success, init_cost
        self.patience, self.multiplier, self.early_stop_patience = patience, multiplier, early_stop_patience
        self.cost, self.best, self.best_l1 = 0.0, None, float("inf")
        self.counters = {"set": 0, "up": 0, "down": 0, "stop": 0}
        self.hits = self.seen = 0

    def loss(self, inversion, x, y):
        logits = self.model(inversion(x)).float()
        m = inversion.mask()
        self.hits += int((logits.argmax(1) == y).sum())
        self.seen += len(x)
        self.last = {"mask": m.detach().clone(), "pattern": inversion.pattern().detach().clone(),
                     "l1": float(m.detach().abs().sum())}
        return F.cross_entropy(logits, y) + self.cost * m.abs().sum()

    def end_epoch(self, epoch):
        rate, l1, c = self.hits / self.seen, self.last["l1"], self.counters
        self.hits = self.seen = 0
        self.last["success"] = rate
        if rate >= self.success and l1 < self.best_l1:
            self.best = dict(self.last)
        # early stop: no 1 % improvement of the best L1 for early_stop_patience epochs, once the cost is set
        c["stop"] = 0 if l1 < 0.99 * self.best_l1 or self.cost == 0 else c["stop"] + 1
        if rate >= self.success:
            self.best_l1 = min(self.best_l1, l1)
        if self.cost > 0 and c["stop"] >= self.early_stop_patience:
            return True
        if self.cost == 0:  # the cost starts once the attack succeeds
            c["set"] = c["set"] + 1 if rate >= self.success else 0
            if c["set"] >= self.patience:
                self.cost, c["up"], c["down"] = self.init_cost, 0, 0
            return False
        c["up"], c["down"] = (c["up"] + 1, 0) if rate >= self.success else (0, c["down"] + 1)
        if c["up"] >= self.patience:
            self.cost, c["up"] = self.cost * self.multiplier, 0
        elif c["down"] >= self.patience:
            self.cost, c["down"] = self.cost / self.multiplier ** 1.5, 0
        return False


def invert_trigger(model: nn.Module, images: torch.Tensor, target: int, *, seed: int, epochs: int = 80,
                   batch_size: int = 256, lr: float = 0.1, init_cost: float = 1e-3,
                   success: float = 0.98, patience: int = 5, multiplier: float = 2.0,
                   early_stop_patience: int = 25, progress: bool = False) -> dict:
    """Neural Cleanse's trigger inversion (Wang et al., S&P 2019): the smallest mask m (H, W) and
    pattern p (C, H, W), both in [0, 1] through a tanh, such that ``(1 - m) x + m p`` sends the
    uint8 ``images`` (N, C, H, W) to ``target``. It is a training run of the one loop
    (:class:`TriggerInversion` is the model, the classifier frozen in eval mode): Adam (betas 0.5, 0.9)
    on cross-entropy + cost * |m|_1, over ``epochs`` passes of shuffled batches; the cost starts at 0
    and is set to ``init_cost`` once the attack succeeds on ``success`` of the images for ``patience``
    epochs, then multiplied by ``multiplier`` after ``patience`` successful epochs and divided by
    ``multiplier ** 1.5`` after as many failed ones; the search stops after ``early_stop_patience``
    epochs without a 1 % smaller mask. ``seed`` draws the start and the batches. Returns the best
    (smallest L1 among the successful) ``{"mask", "pattern", "l1", "success"}``; if no epoch
    succeeded, the last."""
    inversion = TriggerInversion(images.shape[1:], torch.Generator().manual_seed(seed), images.device)
    step = InversionStep(model, success, init_cost, patience, multiplier, early_stop_patience)
    opt = Optim(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adam", betas=(0.5, 0.9), weight_decay=0.0)
    data = Split(images, torch.full((len(images),), target, device=images.device))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        model.requires_grad_(False)  # the input's gradient only
        try:
            train(inversion, data, opt, seed=seed, step=step, desc=f"invert {target}", progress=progress)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    return step.best or step.last


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's anomaly index of each class's trigger L1 norm: its distance from the median
    in units of the consistent median absolute deviation (1.4826 x MAD). A class is flagged when
    its norm is *below* the median and its index exceeds 2."""
    median = norms.median()
    mad = 1.4826 * (norms - median).abs().median()
    return (norms - median).abs() / mad.clamp_min(1e-12)


def universal_ascent(model: nn.Module, images: torch.Tensor, *, lr: float = 10.0, reg: float = 1e-3,
                     batch_size: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
    """An untargeted universal perturbation (1, C, H, W) by one pass of SGD over ``images`` (float
    [0, 1], in shuffled batches): maximise the cross-entropy of the model's own predictions on the
    clean images, less ``reg * ||delta||^2`` (I-BAU's inner problem; unclipped, as there)."""
    delta = torch.zeros((1, *images.shape[1:]), device=images.device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    order = torch.randperm(len(images), generator=generator,
                           device=generator.device if generator is not None else images.device)
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[order[i:i + batch_size].to(images.device)]
            with torch.no_grad():
                pseudo = model(x).argmax(1)
            loss = -F.cross_entropy(model(x + delta), pseudo) + reg * delta.pow(2).sum()
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            opt.step()
    return delta.detach()


def shared_adversarial(model: nn.Module, reference: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                       eps: float = 0.2, step: float = 0.2, steps: int = 5, beta_adv: float = 0.01,
                       beta_shared: float = 1.0) -> torch.Tensor:
    """Shared adversarial examples of two models (Wei et al., NeurIPS 2023, SAU): a per-image L-inf
    perturbation (returned, (N, C, H, W)) that makes *both* models leave their clean predictions
    *and* agree on the wrong label. Signed descent on ``beta_adv * L_adv + beta_shared * L_shared``:
    L_adv is minus the cross-entropy of the true labels, summed over the images each model still
    classifies as before (averaged over the two models); L_shared the Jensen-Shannon divergence of
    the two models' outputs on the images not yet shared. Starts at +eps everywhere and stops early
    once every image is shared, as the authors' ``Shared_PGD`` (``init_type="max"``); like theirs,
    the perturbed image is not clamped to [0, 1]."""
    n = len(images)
    with eval_mode(model), eval_mode(reference):
        with torch.no_grad():
            before, before_ref = model(images).argmax(1), reference(images).argmax(1)
        delta = torch.full_like(images, eps)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits, logits_ref = model(images + delta).float(), reference(images + delta).float()
            fooled, fooled_ref = logits.argmax(1) != before, logits_ref.argmax(1) != before_ref
            shared = fooled & fooled_ref & (logits.argmax(1) == logits_ref.argmax(1))
            adv = -((F.cross_entropy(logits, labels, reduction="none") * ~fooled).sum()
                    + (F.cross_entropy(logits_ref, labels, reduction="none") * ~fooled_ref).sum()) / (2 * n)
            p, q = logits.softmax(1).clamp_min(1e-8), logits_ref.softmax(1).clamp_min(1e-8)
            m = (p + q) / 2
            js = 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log())).sum(1)
            (grad,) = torch.autograd.grad(beta_adv * adv + beta_shared * (js * ~shared).sum() / n, [delta])
            delta = (delta.detach() - step * grad.sign()).clamp(-eps, eps)
            if bool(shared.all()):
                break
    return delta.detach()
