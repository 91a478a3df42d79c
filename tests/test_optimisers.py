"""One training loop for every optimiser: the loop builds and schedules the model's optimiser (SGD,
Adam, AdamW) and the side networks a step declares; no method keeps an optimiser or an lr of its own."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nadbench import Split
from nadbench.training.augment import to_float
from nadbench.training.train import Optim, Step, train

ROOT = Path(__file__).resolve().parents[1]


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 4)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_through_the_loop_matches_a_hand_written_adam_loop_step_for_step(kind):
    """The loop's batches (its generator's permutation per epoch), torch's Adam at the schedule's lr:
    the same weights after every step as a loop written out by hand."""
    data, opt = _data(), Optim(epochs=2, lr=0.01, batch_size=16, optimizer=kind, betas=(0.5, 0.9),
                               weight_decay=0.01, schedule="cosine")
    model, snapshots = _net(), []
    train(model, data, opt, seed=3, progress=False,
          on_step=lambda i: snapshots.append([p.detach().clone() for p in model.parameters()]))

    ref = _net()
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    adam = cls(ref.parameters(), lr=0.01, betas=(0.5, 0.9), weight_decay=0.01)
    gen, steps = torch.Generator().manual_seed(3), 3
    for epoch in range(2):
        order = torch.randperm(48, generator=gen)
        for i in range(steps):
            for group in adam.param_groups:
                group["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * (epoch + i / steps) / 2))
            idx = order[i * 16:(i + 1) * 16]
            loss = F.cross_entropy(ref(to_float(data.images[idx])), data.labels[idx])
            adam.zero_grad()
            loss.backward()
            adam.step()
            for got, want in zip(snapshots[epoch * steps + i], ref.parameters()):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert len(snapshots) == 6


def test_a_side_network_declared_by_a_step_is_built_scheduled_and_stepped_by_the_loop():
    """A step that trains a side network (here a learnt additive input offset, a generator in
    miniature) with its own Adam and step schedule: the loop sets its lr by that schedule before every
    step, the model's by the run's, and both learn."""
    data = _data()
    seen = []

    class Offset(Step):
        def networks(self, model, data):
            self.offset = nn.Parameter(torch.zeros(3, 8, 8))
            self.net = nn.ParameterList([self.offset])
            return {"offset": (self.net, Optim(epochs=2, lr=0.05, optimizer="adam", milestones=(1,), gamma=0.5))}

        def update(self, model, x, y, optimizer):
            side = self.optimizers["offset"]
            seen.append((self.t, optimizer.param_groups[0]["lr"], side.param_groups[0]["lr"]))
            loss = F.cross_entropy(model(x + self.offset), y)
            optimizer.zero_grad()
            side.zero_grad()
            loss.backward()
            optimizer.step()
            side.step()
            return loss.detach()

    model, step = _net(), Offset()
    before = [p.detach().clone() for p in model.parameters()]
    train(model, data, Optim(epochs=2, lr=0.1, batch_size=16, milestones=(1,)), seed=0, step=step, progress=False)
    assert [t for t, _, _ in seen] == [epoch + i / 3 for epoch in range(2) for i in range(3)]
    assert [lr for _, lr, _ in seen] == [0.1] * 3 + [pytest.approx(0.01)] * 3
    assert [lr for _, _, lr in seen] == [0.05] * 3 + [0.025] * 3
    assert step.offset.abs().sum() > 0                                     # the side network learnt
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # and so did the model
    assert isinstance(step.optimizers["offset"], torch.optim.Adam)


def test_a_step_may_compress_the_runs_schedule_into_the_epochs_after_its_own():
    opt = Optim(epochs=4, lr=0.2, schedule="onecycle", start=2)
    assert opt.lr_at(0) == opt.lr_at(1.5) == 0.0                           # the schedule's start
    assert opt.lr_at(2.4) == pytest.approx(Optim(epochs=4, lr=0.2, schedule="onecycle").lr_at(0.8))
    with pytest.raises(ValueError, match="valid: sgd, adam, adamw"):
        Optim(epochs=1, optimizer="rmsprop").build([nn.Parameter(torch.zeros(1))])


def test_no_method_keeps_a_dummy_schedule_or_sets_a_learning_rate_itself():
    """The loop sets every learning rate (``Optim.set_lr``); a method that needs Adam or a side
    network says so through its Optim and its step, not with ``Optim(lr=0.0)`` beside an optimiser
    of its own or by writing ``param_groups[...]["lr"]``."""
    dummy = re.compile(r"Optim\([^)]*\blr=0(\.0*)?(?![\d.eE])")
    assign = re.compile(r"""\[["']lr["']\]\s*=""")
    found = []
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        text = path.read_text()
        if path.name == "train.py":  # Optim.set_lr, the one assignment
            text = text.replace('            group["lr"] = lr\n', "", 1)
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for rx in (dummy, assign) for m in rx.finditer(text)]
    assert not found, found
