"""IAD (plugins/attacks/iad.py, nadbench.toolkit.iad_networks): a sample-specific trigger, learnt state that
comes back exactly, and a step that trains the mask network first, then classifier and generator on
backdoor and cross samples. Toy data and a few optimisation steps only: no real training."""
import pytest
import torch

from conftest import toy_split
from nadbench.toolkit.iad_networks import IADGenerator, MaskGenerator
from nadbench.plugins.attacks.iad import IAD, IADStep
from nadbench.training.train import Optim, train


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 10))


def _built(seed=0, width=32, data=None):
    """An attack with random networks whose BatchNorm statistics are those of ``data`` (as a trained
    network's are of its data): with the initial statistics, untrained nets in eval mode saturate
    their tanh and give every image nearly the same output."""
    torch.manual_seed(seed)
    attack = IAD(IAD.Config(width=width))
    attack.build(3, torch.device("cpu"), width)
    for net in (attack.generator, attack.mask_net):
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics
        with torch.no_grad():
            net.train()(toy_split(8, 9).images.float() / 255 if data is None else data)
        for m in norms:
            m.momentum = 0.05
    return attack


def _snap(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_the_networks_are_the_official_shapes_and_outputs_lie_in_0_1():
    x = torch.rand(2, 3, 32, 32)
    g, m = IADGenerator().eval(), MaskGenerator().eval()
    with torch.no_grad():
        pattern, mask = g(x), m(x)
    assert pattern.shape == x.shape and mask.shape == (2, 1, 32, 32)
    assert all(0 < float(t.min()) and float(t.max()) < 1 for t in (pattern, mask))
    # (out, in) channels of the 13 convolutions, as the official CIFAR-10 generator's
    assert [tuple(p.shape[:2]) for n, p in g.named_parameters() if n.endswith("conv2d.weight")] == [
        (32, 3), (32, 32), (64, 32), (64, 64), (128, 64), (128, 128), (128, 128),
        (128, 128), (64, 128), (64, 64), (32, 64), (32, 32), (3, 32)]
    with pytest.raises(ValueError, match="divisible"):
        g(torch.rand(1, 3, 28, 28))


def test_the_trigger_is_sample_specific():
    images = toy_split(8, 0).images
    x = images.float() / 255
    attack = _built(data=x)
    residual = (attack.apply_trigger(images).float() / 255 - x).flatten(1)
    norms = residual.norm(dim=1)
    off = ~torch.eye(8, dtype=torch.bool)
    assert bool((norms > 0).all())
    assert float((torch.cdist(residual, residual) / ((norms[:, None] + norms[None]) / 2))[off].min()) > 0.3
    # Not merely because the images differ: pattern and mask depend on the image (a static blend
    # trigger would give every image the same), so another image's trigger is not this one's own.
    with torch.no_grad():
        patterns, masks = attack.generator(x), attack.mask_net(x)
    for t in (patterns.flatten(1), masks.flatten(1)):
        assert float((torch.cdist(t, t) / t.norm(dim=1).mean())[off].min()) > 0.05
    own = x + (patterns - x) * masks
    cross = x + (patterns.roll(1, 0) - x) * masks.roll(1, 0)  # what a cross sample gets
    assert torch.allclose(cross, attack.trigger(x, source=x.roll(1, 0)), atol=1e-5)
    assert float(((own - cross).flatten(1).norm(dim=1) / (own - x).flatten(1).norm(dim=1)).min()) > 0.3


def test_learned_state_comes_back_exactly_on_a_fresh_attack():
    attack = _built(1, width=8)  # BatchNorm statistics that are not the initial ones
    state = attack.learned_state()
    assert {k.split(".")[0] for k in state} == {"generator", "mask"}
    assert len(state) == len(attack.generator.state_dict()) + len(attack.mask_net.state_dict())
    fresh = IAD()
    with pytest.raises(RuntimeError, match="no generator"):
        fresh.apply_trigger(toy_split(2, 0).images)
    fresh.load_learned_state(state)
    images = toy_split(8, 2).images
    assert torch.equal(fresh.apply_trigger(images), attack.apply_trigger(images))
    assert [m.num_features for m in fresh.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)][0] == 8
    # the poison stage changes nothing: the step makes every sample
    data = toy_split(16, 0)
    poisoned, index = fresh.poison_train(data, torch.Generator().manual_seed(0))
    assert torch.equal(poisoned.images, data.images) and torch.equal(poisoned.labels, data.labels)
    assert len(index) == 0


def test_the_step_trains_the_mask_first_then_classifier_and_generator_on_backdoor_and_cross_samples():
    data = toy_split(16, 0)
    # batches of 8: 2 backdoor and 2 cross rows; networks of width 8 (official 32) to stay fast
    attack = IAD(IAD.Config(p_attack=0.25, p_cross=0.25, width=8))
    model, batches, snaps = _tiny_model(), [], []

    class Recording(IADStep):
        def batch(self, x, y, index, generator):
            out_x, out_y = super().batch(x, y, index, generator)
            if not snaps:  # the networks are built before the first batch
                snaps.append((_snap(model), _snap(self.G), _snap(self.M)))
            batches.append({"epoch": int(self.t), "x": x.clone(), "y": y.clone(), "y_out": out_y.clone()})
            return out_x, out_y

        def update(self, model, x, y, optimizer):
            rec = batches[-1]
            loss = super().update(lambda inp: (rec.__setitem__("input", inp.detach().clone()), model(inp))[1],
                                  x, y, optimizer)
            rec.update(lr=optimizer.param_groups[0]["lr"], lr_G=self.optimizers["generator"].param_groups[0]["lr"])
            return loss

    step = Recording(attack)
    opt = Optim(epochs=2, lr=0.1, batch_size=8, schedule="onecycle")
    train(model, data, opt, seed=0, step=step, progress=False,
          on_epoch=lambda epoch, loss: snaps.append((_snap(model), _snap(step.G), _snap(step.M))))
    assert step.m == 1 and [b["epoch"] for b in batches] == [0, 0, 1, 1]
    start, after_mask, after_joint = snaps
    # epoch 0: only the mask network learns (the classifier is not even run)
    assert any(not torch.equal(start[2][k], after_mask[2][k]) for k in start[2])
    assert all(torch.equal(start[0][k], after_mask[0][k]) for k in start[0])
    assert all(torch.equal(start[1][k], after_mask[1][k]) for k in start[1])
    assert all("input" not in b and torch.equal(b["y_out"], b["y"]) for b in batches[:2])
    # epoch 1: classifier and generator learn, the mask network is frozen
    assert any(not torch.equal(after_mask[0][k], after_joint[0][k]) for k in start[0])
    assert any(not torch.equal(after_mask[1][k], after_joint[1][k]) for k in start[1])
    assert all(torch.equal(after_mask[2][k], after_joint[2][k]) for k in start[2])
    assert not any(p.requires_grad for p in step.M.parameters())
    for b in batches[2:]:
        assert torch.equal(b["y_out"][:2], torch.zeros(2, dtype=torch.long))  # backdoor rows: the target
        assert torch.equal(b["y_out"][2:], b["y"][2:])  # cross and clean rows keep their labels
        changed = (b["input"] != b["x"]).flatten(1).any(1)
        assert changed[:4].all() and not changed[4:].any()  # backdoor and cross rows carry a trigger
    # the profile's onecycle schedule runs in the one joint epoch: warm-up from 0, then decay
    assert [b["lr"] for b in batches[2:]] == [0.0, pytest.approx(0.1 * 0.5 / 0.8)]
    assert [b["lr_G"] for b in batches[2:]] == [0.0, pytest.approx(0.01 * 0.5 / 0.8)]
    assert attack.generator is step.G and attack.mask_net is step.M  # the learnt trigger is the attack's


@pytest.mark.parametrize("zero", [True, False])
def test_the_generators_gradients_are_zeroed_every_step_unless_asked_to_sum_as_the_official_code(zero):
    """VinAIResearch/input-aware-backdoor-attack-release 1750e4ff, train.py: only optimizerC.zero_grad()
    in the joint loop, so netG's gradients sum over the run; ours zero them unless told not to."""
    assert IAD().config.zero_generator_grads
    attack = IAD(IAD.Config(p_attack=0.25, p_cross=0.25, width=8, zero_generator_grads=zero))
    calls, grads = {"generator": 0, "classifier": 0}, []

    class Counting(IADStep):
        def update(self, model, x, y, optimizer):
            if self.t >= self.m and not grads:  # count each optimizer's zero_grad from the first joint step
                for name, opt in (("generator", self.optimizers["generator"]), ("classifier", optimizer)):
                    opt.zero_grad = (lambda f, n: lambda **kw: (calls.__setitem__(n, calls[n] + 1), f(**kw)))(
                        opt.zero_grad, name)
            loss = super().update(model, x, y, optimizer)
            if self.t >= self.m:
                grads.append(next(self.G.parameters()).grad.clone())
            return loss

    train(_tiny_model(), toy_split(24, 0), Optim(epochs=2, lr=0.1, batch_size=8), seed=0, step=Counting(attack),
          progress=False)
    assert calls == {"generator": 3 if zero else 0, "classifier": 3}
    assert len(grads) == 3 and not torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("epochs, mask", [(1, 0), (2, 1), (10, 2), (100, 25)])
def test_mask_epochs_are_a_share_of_the_run_and_leave_joint_epochs(epochs, mask):
    assert IADStep(IAD()).mask_epochs(epochs) == mask


def test_all_to_all_targets_are_the_next_class():
    attack = IAD(IAD.Config(target_mode="all2all", p_attack=0.25, p_cross=0.25, width=8))
    attack.num_classes = 10
    data = toy_split(16, 3)
    step = attack.train_step(attack.poison_train(data, torch.Generator())[1], len(data))
    step.optim = step.schedule(Optim(epochs=1, batch_size=16))  # one epoch: no mask epoch, straight to joint batches
    step.networks(None, data)
    _, y = step.batch(data.images.float() / 255, data.labels, torch.arange(16), torch.Generator().manual_seed(0))
    assert torch.equal(y[:4], (data.labels[:4] + 1) % 10) and torch.equal(y[4:], data.labels[4:])
    triggered = attack.trigger_test(data)  # every image's target differs from its label: all kept
    assert len(triggered) == 16 and torch.equal(triggered.labels, data.labels)
    assert torch.equal(attack.targets(triggered.labels), (data.labels + 1) % 10)
