"""The defense toolkit in the core (nadbench.toolkit.channels, nadbench.training.steps.SAMStep) and the mechanisms of
the defenses built on it (CLP, FT-SAM): each test is one a renamed finetuning, or a mask that
leaks into other channels, would fail. Tiny inputs, float32 on the CPU."""
import torch
from torch import nn

from conftest import toy_split
from nadbench.contract.api import DefenseContext
from nadbench.toolkit.channels import (NeuronMasks, batch_norms, bn_after_sum, channel_lipschitz, conv_bn_pairs,
                               prune_bn)
from nadbench.engine.defending import apply_defense
from nadbench.training.models import build
from nadbench.engine.registry import get_registry
from nadbench.training.steps import SAMStep
from nadbench.training.train import Optim, Step, train


def _wrn(seed=0):
    reg = get_registry()
    torch.manual_seed(seed)
    model = build(reg.model("wrn-16-1"), reg.dataset("cifar10")).eval()
    with torch.no_grad():  # non-trivial BN affine parameters and statistics, as in a trained model
        for bn in batch_norms(model).values():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 2.0)
    return model


def _bn_outputs(model, x):
    """{BN name: its output} for one forward pass."""
    seen, hooks = {}, []
    for name, bn in batch_norms(model).items():
        hooks.append(bn.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.detach())))
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return seen, logits


def test_pairs_come_from_the_graph_and_bns_after_a_residual_sum_are_unpaired():
    """Pre-activation WRN-16-1: each block's second BN follows its first conv; the first block's first
    BN follows the stem conv; every other block-input BN and the final BN follow a residual sum."""
    model = _wrn()
    pairs = {(p.conv, p.bn) for p in conv_bn_pairs(model)}
    blocks = [f"net.block{g}.layer.{i}" for g in (1, 2, 3) for i in (0, 1)]
    assert pairs == {("net.conv1", "net.block1.layer.0.bn1")} | {(f"{b}.conv1", f"{b}.bn2") for b in blocks}
    assert set(bn_after_sum(model)) == {f"{b}.bn1" for b in blocks[1:]} | {"net.bn1"}
    assert len(pairs) + len(bn_after_sum(model)) == len(batch_norms(model))  # every BN is one or the other


def test_masks_change_exactly_the_named_channels_and_leave_the_model_as_it_was():
    model, x = _wrn(), torch.rand(4, 3, 32, 32)
    before, logits = _bn_outputs(model, x)
    name = "net.block2.layer.0.bn2"
    with NeuronMasks(model) as masks:
        assert {p.data_ptr() for p in masks.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())
        with torch.no_grad():
            masks.weight[name.replace(".", "/")][[3, 7]] = 0
            masks.bias[name.replace(".", "/")][[3, 7]] = 0
        during, _ = _bn_outputs(model, x)
    # The masked BN: channels 3 and 7 are zero, the others as before (its input is upstream of it).
    out = during[name]
    assert torch.equal(out[:, [3, 7]], torch.zeros_like(out[:, [3, 7]]))
    keep = [c for c in range(out.shape[1]) if c not in (3, 7)]
    assert torch.allclose(out[:, keep], before[name][:, keep], atol=1e-6)
    # Upstream BNs are untouched; on exit the model computes exactly what it did.
    assert torch.equal(during["net.block1.layer.0.bn2"], before["net.block1.layer.0.bn2"])
    assert torch.equal(_bn_outputs(model, x)[1], logits)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_folded_masks_and_pruning_equal_the_masked_model():
    model, x = _wrn(), torch.rand(4, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    masks = NeuronMasks(model)
    with torch.no_grad():
        for p in masks.parameters():
            p.copy_(torch.rand(p.shape, generator=gen))
    masked = _bn_outputs(model, x)[1]
    folded = masks.fold()
    assert not any("parametrizations" in n for n, _ in folded.named_parameters())
    assert torch.allclose(_bn_outputs(folded, x)[1], masked, atol=1e-5)

    # prune_bn is a 0/1 mask folded in.
    model, chosen = _wrn(), {"net.block1.layer.1.bn2": [0, 5], "net.bn1": [2]}
    with NeuronMasks(model) as masks:
        with torch.no_grad():
            for name, idx in chosen.items():
                masks.weight[name.replace(".", "/")][idx] = 0
                masks.bias[name.replace(".", "/")][idx] = 0
        masked = _bn_outputs(model, x)[1]
    assert torch.allclose(_bn_outputs(prune_bn(model, chosen), x)[1], masked, atol=1e-6)


def test_channel_lipschitz_is_the_scaled_spectral_norm_of_each_filter():
    conv, bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2), bn.running_var.uniform_(0.5, 2)
    got = channel_lipschitz(conv, bn)
    for k in range(6):
        sigma = torch.linalg.svdvals(conv.weight[k].detach().reshape(4, -1))[0]
        assert torch.isclose(got[k], sigma * abs(bn.weight[k].detach()) / (bn.running_var[k] + bn.eps).sqrt())


def _ctx(**kw):
    return DefenseContext(device=torch.device("cpu"), num_classes=10, student="wrn-16-1", teacher="wrn-16-1",
                          seed=0, progress=False, **kw)


def test_clp_reads_no_data_prunes_a_planted_channel_and_leaves_every_other_weight_bit_identical():
    reg = get_registry()
    model = _wrn()
    conv = model.get_submodule("net.block2.layer.1.conv1")
    with torch.no_grad():
        conv.weight[9] *= 20  # a channel whose output jumps with its input: what a trigger channel looks like
    original = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    class Spy(reg.defense("clp")):
        def defend(self, model, clean, ctx):
            seen.append(len(clean))
            return super().defend(model, clean, ctx)

    logged = {}
    repaired, _ = apply_defense(Spy(), model, toy_split(64, 0), _ctx(
        log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v)))
    assert seen == [0]  # the core hands a data-free defense no image
    state = repaired.model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    pruned = {n: (bn.weight == 0).nonzero().flatten().tolist() for n, bn in batch_norms(repaired.model).items()
              if (bn.weight == 0).any()}
    assert 9 in pruned["net.block2.layer.1.bn2"]
    assert changed == {f"{n}.{p}" for n in pruned for p in ("weight", "bias")}
    for n, idx in pruned.items():  # within a pruned BN only the pruned channels changed
        keep = [c for c in range(len(original[f"{n}.weight"])) if c not in idx]
        assert torch.equal(state[f"{n}.weight"][keep], original[f"{n}.weight"][keep])
        assert torch.equal(state[f"{n}.bias"][idx], torch.zeros(len(idx)))
    assert logged["clp.pruned_total"] == [sum(map(len, pruned.values()))]
    assert not set(pruned) & set(bn_after_sum(model))  # unpaired BNs are never pruned


def test_sam_step_takes_two_passes_and_applies_the_gradient_at_the_ascended_point(monkeypatch, run_settings):
    run_settings(precision="float32")  # compared with a float32 computation by hand
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = toy_split(8, 0)
    data = type(data)(data.images[:, :, :2, :2], data.labels % 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    step = SAMStep(rho=0.5, adaptive=True)
    opt = Optim(epochs=1, lr=0.1, batch_size=8, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="step")
    train(model, data, opt, seed=0, step=step, progress=False)
    assert step.passes == 2 and len(forwards) == 2  # one batch: two forward-backward passes

    # By hand: g at w0, e = rho |w|^2 g / ||w g||, gradient at w0 + e, applied at w0.
    ref = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = data.images.float() / 255
    with torch.no_grad():
        for p, w in zip(ref.parameters(), w0):
            p.copy_(w)
    nn.functional.cross_entropy(ref(x), data.labels).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    norm = torch.sqrt(sum(((w.abs() * gi) ** 2).sum() for w, gi in zip(w0, g)))
    with torch.no_grad():
        for p, w, gi in zip(ref.parameters(), w0, g):
            p.copy_(w + 0.5 * w.pow(2) * gi / norm)
            p.grad = None
    nn.functional.cross_entropy(ref(x), data.labels).backward()
    for p, w, r in zip(model.parameters(), w0, ref.parameters()):
        assert torch.allclose(p.detach(), w - 0.1 * r.grad, atol=1e-6)


def _only_masks_move(make_step):
    """A mask-learning step (``make_step(masks)``) moves the masks, within [0, 1], and leaves every
    parameter of the network bit-identical."""
    model = _wrn()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = NeuronMasks(model.requires_grad_(False), bias=False)
    opt = Optim(epochs=1, lr=0.2, batch_size=16, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="step")
    train(model, toy_split(32, 0), opt, seed=0, step=make_step(masks), progress=False)
    moved = torch.cat([m.flatten() for m in masks.values().values()])
    assert (moved < 1).any() and (moved >= 0).all() and (moved <= 1).all()
    masks.remove()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_anp_learns_only_masks_and_prunes_only_bn_weights(monkeypatch, run_settings):
    """ANP's step moves the masks alone (the network's parameters are bit-identical after mask
    training); the repaired model differs from the original only in zeroed BN weights."""
    run_settings(precision="float32")
    reg = get_registry()
    anp = reg.defense("anp")
    from nadbench.plugins.defenses.anp import ANPStep

    _only_masks_move(lambda masks: ANPStep(masks, anp.Config(), 0))

    model = _wrn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    defense = anp.from_overrides({"iterations": "4", "batch_size": "16", "rule": "threshold", "threshold": "0.99"})
    repaired, _ = apply_defense(defense, model, toy_split(32, 0), _ctx())
    state = repaired.model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 1)[0] in batch_norms(model) for k in changed)
    for k in changed:
        diff = state[k] != original[k]
        assert (state[k][diff] == 0).all()


def test_fst_reinitialises_the_head_and_keeps_its_norm(monkeypatch, run_settings):
    run_settings(precision="float32")
    model = _wrn()
    head = model.get_submodule("net.fc")
    original = head.weight.detach().clone()
    defense = get_registry().defense("fst").from_overrides({"epochs": "1", "batch_size": "16"})
    repaired, _ = apply_defense(defense, model, toy_split(32, 0), _ctx(classifier_layer="net.fc"))
    new = repaired.model.get_submodule("net.fc").weight.detach()
    cos = float((new * original).sum() / (new.norm() * original.norm()))
    assert abs(cos) < 0.3, cos  # a fresh head (a finetuned one keeps cos ~ 1 after one epoch)
    assert torch.isclose(new.norm(), original.norm(), rtol=1e-4)


class _PlantedPatch(nn.Module):
    """A toy classifier of 3x8x8 images with a planted backdoor: random linear logits for 6 classes
    (rows centred, so that the classes share the images), and class 5 wins whenever the 2x2 top-left
    patch is near white (a smooth step, so that the inversion has a gradient to follow)."""

    def __init__(self):
        super().__init__()
        w = torch.randn(6, 192, generator=torch.Generator().manual_seed(0))
        self.w = nn.Parameter(0.5 * (w - w.mean(1, keepdim=True)))

    def forward(self, x):
        patch = x[:, :, :2, :2].mean((1, 2, 3))
        bonus = torch.zeros(len(x), 6, device=x.device)
        bonus[:, 5] = 30 * torch.sigmoid(15 * (patch - 0.75))
        return x.flatten(1) @ self.w.T + bonus


def test_trigger_inversion_recovers_a_planted_patch_and_flags_its_class(monkeypatch, run_settings):
    from nadbench.toolkit.adversarial import anomaly_indices, invert_trigger

    run_settings(precision="float32")
    model, gen = _PlantedPatch(), torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8, generator=gen)
    found = [invert_trigger(model, images, c, seed=c, epochs=60, batch_size=64) for c in range(6)]
    mask = found[5]["mask"]
    assert found[5]["success"] >= 0.98
    assert mask[:2, :2].sum() > 0.6 * mask.sum()  # the mass of the target's mask is on the patch
    norms = torch.tensor([f["l1"] for f in found])
    index = anomaly_indices(norms)
    print("L1 per class", norms.tolist(), "anomaly index", index.tolist())
    assert int(norms.argmin()) == 5 and index[5] > 2


def test_anomaly_index_is_the_distance_from_the_median_in_consistent_mads():
    from nadbench.toolkit.adversarial import anomaly_indices

    index = anomaly_indices(torch.tensor([10.0, 11.0, 12.0, 13.0, 2.0]))
    # median 11, |x - 11| = 1 0 1 2 9, MAD 1, scaled 1.4826
    assert torch.allclose(index, torch.tensor([1, 0, 1, 2, 9]) / 1.4826)


def test_neural_cleanse_logs_the_anomaly_index_and_the_inverted_triggers_and_unlearns_the_flagged_class(monkeypatch, run_settings):
    import matplotlib.pyplot as plt

    from nadbench import Split

    run_settings(precision="float32")
    gen = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(256) % 6)
    logged, figures, trained = {}, [], []
    import nadbench.plugins.defenses.neural_cleanse as nc

    monkeypatch.setattr(nc, "train", lambda model, data, opt, **kw: trained.append(data) or model)
    defense = get_registry().defense("neural-cleanse").from_overrides({"epochs": "60", "batch_size": "64"})
    ctx = DefenseContext(device=torch.device("cpu"), num_classes=6, student="toy", teacher="toy", seed=0, progress=False,
                         log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v),
                         log_figure=lambda fig, path: figures.append(path) or plt.close(fig))
    apply_defense(defense, _PlantedPatch(), clean, ctx)
    assert logged["nc.flagged"] == [1] and len(logged["nc.anomaly_index"]) == 6
    assert logged["nc.anomaly_index"][5] > 2 and figures == ["nc_triggers.png"]
    (data,) = trained  # unlearning: 20 % of the images stamped with class 5's trigger, labels kept
    changed = (data.images != clean.images).flatten(1).any(1)
    assert int(changed.sum()) == round(0.2 * 256) and torch.equal(data.labels, clean.labels)
    with torch.no_grad():  # stamped with class 5's inverted trigger: the backdoored model sends them there
        assert (_PlantedPatch()(data.images[changed].float() / 255).argmax(1) == 5).float().mean() > 0.9


def test_the_implicit_hypergradient_matches_finite_differences():
    """Inner solution w*(theta) = tanh(B theta), the fixed point of a gradient step on
    0.5 ||w - tanh(B theta)||^2; outer f(w, theta) depends on both. The hypergradient at w* equals
    central finite differences of f(w*(theta), theta); without the implicit term (K = 0) it does not."""
    from nadbench.toolkit.implicit import fixed_point_hypergradient

    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 3, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    solution = lambda th: torch.tanh(B @ th)  # noqa: E731
    fp_map = lambda w, th: [w[0] - 0.5 * (w[0] - solution(th[0]))]  # noqa: E731
    outer = lambda w, th: torch.sin(w[0]).sum() + (w[0] * (B @ th[0])).sum() + 0.5 * th[0].pow(2).sum()  # noqa: E731
    (got,) = fixed_point_hypergradient([solution(theta).detach()], [theta], 40, fp_map, outer)
    h, eye = 1e-6, torch.eye(3, dtype=torch.float64)
    with torch.no_grad():
        f = lambda th: outer([solution(th)], [th])  # noqa: E731
        fd = torch.stack([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in eye])
    assert torch.allclose(got, fd, atol=1e-7), (got, fd)
    (plain,) = fixed_point_hypergradient([solution(theta).detach()], [theta], 0, fp_map, outer)
    assert not torch.allclose(plain, fd, atol=1e-3)


def test_i_bau_updates_the_model_with_adam_through_the_implicit_gradient(monkeypatch, run_settings):
    run_settings(precision="float32")
    model = _wrn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged = {}
    defense = get_registry().defense("i-bau").from_overrides({"rounds": "2", "batch_size": "16"})
    repaired, _ = apply_defense(defense, model, toy_split(32, 0), _ctx(
        log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v)))
    assert len(logged["defense.loss"]) == 2  # one loop epoch per round
    moved = [n for n, p in repaired.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # the loop's Adam moved every parameter


def test_targeted_pgd_reaches_its_target_within_its_ball_in_both_norms():
    from nadbench.toolkit.adversarial import pgd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=gen)
    labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    for norm, eps, step in (("linf", 0.3, 0.02), ("l2", 3.0, 0.2)):
        adv = pgd(model, x, labels, eps=eps, step=step, steps=60, targets=targets, norm=norm, generator=gen)
        hit = (model(adv).argmax(1) == targets).float().mean()
        size = (adv - x).flatten(1).abs().amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
        assert hit > 0.9 and bool((size <= eps + 1e-5).all()) and adv.min() >= 0 and adv.max() <= 1, (norm, hit)
    untargeted = pgd(model, x, labels, eps=0.3, step=0.02, steps=60, generator=gen)
    assert (model(untargeted).argmax(1) != labels).float().mean() > 0.9


def test_shared_adversarial_examples_make_both_models_agree_on_the_wrong_label():
    """Among images that both models misclassify, the shared attack makes them agree on the label far
    more often than PGD against one of them; it stays in its ball and leaves the models' grads alone."""
    from nadbench.toolkit.adversarial import pgd, shared_adversarial

    agree = {"shared": [0, 0], "pgd": [0, 0]}
    for seed in range(5):
        torch.manual_seed(seed)
        a, b = (nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).eval() for _ in range(2))
        with torch.no_grad():  # a related model, as the repaired one is to the original
            b[1].weight.copy_(a[1].weight + 0.5 * a[1].weight.std() * torch.randn_like(a[1].weight))
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(256, 3, 4, 4, generator=gen)
        y = a(x).argmax(1)
        delta = shared_adversarial(a, b, x, y, eps=0.1, step=0.1, steps=5)
        assert delta.abs().max() <= 0.1 + 1e-6 and all(p.grad is None for p in [*a.parameters(), *b.parameters()])
        for name, d in (("shared", delta), ("pgd", pgd(a, x, y, eps=0.1, step=0.025, steps=20, generator=gen) - x)):
            pa, pb = a(x + d).argmax(1), b(x + d).argmax(1)
            both = (pa != y) & (pb != b(x).argmax(1))
            agree[name][0] += int((both & (pa == pb)).sum())
            agree[name][1] += int(both.sum())
    shared, single = (agree[k][0] / agree[k][1] for k in ("shared", "pgd"))
    assert shared > 0.85 and shared > single + 0.1, (shared, single)


def test_a_step_can_end_training_early():
    class StopAfterTwo(Step):
        def end_epoch(self, epoch):
            return epoch == 1

    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    train(model, toy_split(16, 0), Optim(epochs=5, batch_size=8), seed=0, step=StopAfterTwo(), progress=False,
          on_epoch=lambda e, loss: seen.append(e))
    assert seen == [0, 1]


def test_rnp_unlearns_until_its_window_accuracy_falls_then_learns_only_masks_and_prunes_only_bn_weights(monkeypatch, run_settings):
    run_settings(precision="float32")
    from nadbench.plugins.defenses.rnp import RecoverStep, UnlearnStep

    model = _wrn()
    step = UnlearnStep(floor=1.0, window=32)  # every window is at most 100 %: stop after the first
    seen = []
    train(model, toy_split(64, 0), Optim(epochs=5, batch_size=16), seed=0, step=step, progress=False,
          on_epoch=lambda e, loss: seen.append(e))
    assert step.stopped and seen == [0]

    _only_masks_move(lambda masks: RecoverStep(masks, 0.2))

    model = _wrn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    defense = get_registry().defense("rnp").from_overrides(
        {"unlearning_epochs": "1", "recovering_epochs": "4", "batch_size": "16", "rule": "threshold",
         "threshold": "0.999"})
    repaired, _ = apply_defense(defense, model, toy_split(32, 0), _ctx())
    state = repaired.model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 1)[0] in batch_norms(model) for k in changed)
    assert all((state[k][state[k] != original[k]] == 0).all() for k in changed)


def test_sau_unlearns_shared_adversarial_examples_against_the_frozen_original_in_eval_mode(monkeypatch, run_settings):
    """Each step attacks the model and an unchanged copy of the original; BN statistics stay as they
    were (both in eval mode, as the authors run them), and Adam moves every other parameter."""
    run_settings(precision="float32")
    import nadbench.plugins.defenses.sau as sau
    from nadbench.toolkit.adversarial import shared_adversarial

    model = _wrn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def spy(m, reference, x, y, **kw):
        calls.append(all(torch.equal(v, original[k]) for k, v in reference.state_dict().items())
                     and m is not reference and not m.training)
        return shared_adversarial(m, reference, x, y, **kw)

    monkeypatch.setattr(sau, "shared_adversarial", spy)
    defense = get_registry().defense("sau").from_overrides({"rounds": "2", "batch_size": "16", "lr": "0.01"})
    repaired, _ = apply_defense(defense, model, toy_split(32, 0), _ctx())
    assert calls == [True] * 4  # 2 rounds x 2 batches
    state = repaired.model.state_dict()
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(state[k], original[k]) for k in stats)
    params = dict(repaired.model.named_parameters())
    assert all(not torch.equal(p, original[n]) for n, p in params.items())
