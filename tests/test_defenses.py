"""Fine-pruning and MCR, piece by piece (toy data, seconds), and the defense contract's extra and side models:
every model declares its classifier; pruning order, masking and the held-out rule; the curve's
endpoints and batch-norm recomputation; extra models evaluated and logged by the engine; no test
data reaches a defense. (On real data: tests/test_defenses_e2e.py.)"""
import copy

import pytest
import torch
from torch import nn

from conftest import toy_split
from nadbench import Defended, Defense, ModelSpec
from nadbench.contract.api import DefenseContext
from nadbench.engine import Cell, Runner, profile
from nadbench.training.models import build, classifier_name
from nadbench.plugins.defenses import fine_pruning as fp
from nadbench.toolkit.channels import largest_within_drop as choose
from nadbench.plugins.defenses.fine_pruning import FinePruning
from nadbench.plugins.defenses.finetune import FinetuneConfig
from nadbench.toolkit.channels import recompute_bn
from nadbench.plugins.defenses.mcr import MCR, BezierCurve
from nadbench.engine.registry import get_registry
from nadbench.training.train import Optim, train

# ------------------------------------------------------------------------------ declared classifier


@pytest.mark.parametrize("arch", get_registry().names("models"))
def test_every_model_declares_its_final_linear_layer(arch):
    reg = get_registry()
    model = build(reg.model(arch), reg.dataset("cifar10")).eval()
    name = classifier_name(model, reg.model(arch))
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    hook.remove()
    assert torch.equal(seen[0], logits)  # the layer's output is the model's output: the final one


# ------------------------------------------------------------------------------ fine-pruning
class Tiny(nn.Module):
    """conv -> BN-ReLU -> pool -> fc: 8 channels, the last two left dead so that they rank first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.bn.bias[6:] = -50.0  # channels 6, 7: ReLU output always 0

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _ctx(**kw):
    return DefenseContext(device=torch.device("cpu"), num_classes=10, student="tiny", teacher="tiny", seed=0,
                          classifier_layer="fc", progress=False, **kw)


def test_pruning_stops_before_the_first_step_past_the_drop():
    curve = [(0, 0.90), (1, 0.90), (2, 0.85), (3, 0.70), (4, 0.90)]
    assert choose(curve, 0.1) == 2  # floor 0.81: step 3 falls below; step 4 is never reached
    assert choose(curve, 0.0) == 1
    assert choose(curve, 1.0) == 4


def test_fine_pruning_prunes_the_most_dormant_channels_and_masks_them(monkeypatch):
    torch.manual_seed(0)
    model = Tiny().eval()
    clean = toy_split(200, 0)
    seen = []
    monkeypatch.setattr(fp, "largest_within_drop", lambda curve, drop: seen.append(curve) or 3)  # prune 3 channels
    mean = fp.layer_inputs(model, model.fc, clean.images).mean(0)
    before = copy.deepcopy(model)
    defense = FinePruning(fp.FinePruningConfig(finetune=False))
    logged = {}
    out = defense.defend(model, clean, _ctx(log_metric=lambda k, v, step=None: logged.setdefault(k, []).append(v)))
    pruned = (out.fc.weight == 0).all(0).nonzero().flatten().tolist()
    assert sorted(pruned) == sorted(mean.argsort()[:3].tolist())  # increasing mean activation
    assert {6, 7} <= set(pruned)  # the dead channels first
    assert torch.equal(out.fc.weight[:, [i for i in range(8) if i not in pruned]],
                       before.fc.weight[:, [i for i in range(8) if i not in pruned]])
    # A pruned channel's output no longer reaches the logits, whatever it is.
    x = torch.rand(4, 3, 32, 32)
    feats = torch.relu(out.bn(out.conv(x))).mean((2, 3))
    noisy = feats.clone()
    noisy[:, pruned] += 100
    assert torch.allclose(out.fc(feats), out.fc(noisy))
    assert logged["prune.channels"] == [3] and len(logged["prune.acc"]) == len(seen[0])
    assert [k for k, _ in seen[0]] == list(range(0, int(0.9 * 8) + 1))  # step 1 up to max_ratio


def test_fine_pruning_keeps_masks_through_finetuning():
    torch.manual_seed(0)
    model = Tiny().eval()
    cfg = fp.FinePruningConfig(acc_drop=1.0, max_ratio=0.5, epochs=2, batch_size=50, crop=0, cutout=0)
    out = FinePruning(cfg).defend(model, toy_split(200, 0), _ctx())
    zero_cols = (out.fc.weight == 0).all(0)
    assert int(zero_cols.sum()) == 4  # acc_drop 1.0: as far as max_ratio allows
    assert not out.fc._forward_pre_hooks  # no hook left behind: the pruning lives in the weights


def test_fine_pruning_selects_on_the_clean_subset_only(monkeypatch):
    """What the defense computes activations and accuracy on comes from the clean subset it was given."""
    clean = toy_split(100, 3)
    rows = {bytes(img.flatten().tolist()) for img in clean.images}
    inputs = []
    real = fp.layer_inputs
    monkeypatch.setattr(fp, "layer_inputs", lambda m, c, images, **k: inputs.append(images) or real(m, c, images))
    FinePruning(fp.FinePruningConfig(finetune=False)).defend(Tiny().eval(), clean, _ctx())
    seen = torch.cat(inputs)
    assert len(seen) == len(clean) and all(bytes(img.flatten().tolist()) in rows for img in seen)


def test_fine_pruning_names_the_missing_declaration():
    with pytest.raises(Exception, match="declares none"):
        FinePruning().defend(Tiny(), toy_split(20, 0), DefenseContext(
            device=torch.device("cpu"), num_classes=10, student="tiny", teacher="tiny", seed=0))


# ------------------------------------------------------------------------------ MCR
def _two_models():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    return a, b


def test_curve_endpoints_reproduce_the_two_models_exactly():
    a, b = _two_models()
    curve = BezierCurve(a, a, b, bends=2, seed=0)
    with torch.no_grad():
        for p in curve.controls:
            p.add_(torch.randn_like(p))  # wherever the control points went
    w0, w1 = curve.weights(0.0), curve.weights(1.0)
    for name, p in a.named_parameters():
        assert torch.equal(w0[name], p)
    for name, p in b.named_parameters():
        assert torch.equal(w1[name], p)


def test_quadratic_curve_starts_on_the_straight_line():
    a, b = _two_models()
    curve = BezierCurve(a, a, b, bends=1, seed=0)
    w = curve.weights(0.3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(w[name], torch.lerp(pa, pb, 0.3), atol=1e-6)


def test_curve_training_moves_only_the_control_points():
    a, b = _two_models()
    curve = BezierCurve(a, a, b, bends=1, seed=0)
    ends = [t.clone() for n, t in curve.named_buffers() if n.startswith(("start", "end"))]
    controls = [p.detach().clone() for p in curve.controls]
    train(curve, toy_split(64, 0), Optim(epochs=1, lr=0.1, batch_size=16), seed=0, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(ends, [t for n, t in curve.named_buffers() if n.startswith(("start", "end"))]))
    assert any(not torch.equal(x, p) for x, p in zip(controls, curve.controls))


def test_batch_norm_statistics_are_recomputed_on_the_clean_data():
    torch.manual_seed(0)
    model = Tiny()
    data = toy_split(64, 0)
    recompute_bn(model, data, batch_size=16)
    with torch.no_grad():
        x = model.conv((data.images.float() / 255))
    assert torch.allclose(model.bn.running_mean, x.mean((0, 2, 3)), atol=1e-4)
    assert model.bn.momentum == 0.1 and not model.training


def test_batch_norm_statistics_are_those_of_the_whole_subset_when_it_is_sorted_by_class():
    """Real splits are sorted by class; recomputed in class-sorted batches, the variance was that
    within one class (a quick-profile model fell from 81.8 to 64.1 ACC)."""
    torch.manual_seed(0)
    model = Tiny()
    labels = torch.arange(640) // 64  # sorted by class, 64 images each
    images = (labels.view(-1, 1, 1, 1) * 25 + torch.randint(0, 5, (640, 3, 32, 32))).to(torch.uint8)
    recompute_bn(model, toy_split(1, 0).__class__(images, labels), batch_size=64)
    with torch.no_grad():
        x = model.conv(images.float() / 255)
    assert torch.allclose(model.bn.running_var, x.var((0, 2, 3)), rtol=0.1)


def test_mcr_returns_the_point_at_t_and_points_along_the_curve():
    torch.manual_seed(0)
    model = Tiny()
    cfg = MCR.Config(epochs=1, curve_epochs=1, batch_size=32, curve_batch_size=32, curve_points=5, crop=0, cutout=0)
    start = copy.deepcopy(model)
    logged = []
    out = MCR(cfg).defend(model, toy_split(64, 0), _ctx(log_figure=lambda fig, path: logged.append(path)))
    assert isinstance(out, Defended) and out.axis == "t"
    assert list(out.extras) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(torch.equal(p, q) for p, q in zip(out.extras[0.0].state_dict().values(), start.state_dict().values()))
    assert out.model not in out.extras.values() and logged == ["curve_clean_acc.png"]
    assert all(p.requires_grad for p in out.model.parameters())  # an ordinary model, ready for `bench defend`


# ------------------------------------------------------------------------------ extra models, engine
def _toy_runner(reg, tmp_path, tracker=None, **kwargs):
    return Runner(reg, profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                  device=torch.device("cpu"), progress=False, cache_dir=tmp_path, tracker=tracker, **kwargs)


class WithExtras(Defense):
    name = "with-extras"
    Config = FinetuneConfig
    description = "returns the model and two scaled copies as extras"

    def defend(self, model, clean, ctx):
        return Defended(model, {0.0: copy.deepcopy(model), 1.0: copy.deepcopy(model)}, axis="s")


def test_the_engine_evaluates_and_logs_a_defenses_extra_models(toy_registry, tmp_path, fresh_store):
    from nadbench.engine.tracking import Tracker

    reg = toy_registry(defenses=[WithExtras])
    tracker = Tracker(fresh_store(tmp_path), "extras")
    runner = _toy_runner(reg, tmp_path, tracker)
    result = runner.run_cell(Cell("toy", "badnets", "with-extras", "wrn-16-1", "wrn-16-1", 0))
    points = result["extras"]["points"]
    assert result["extras"]["axis"] == "s" and [p["s"] for p in points] == [0.0, 1.0]
    assert points[0]["acc"] == result["before"]["acc"] and points[0]["asr"] == result["before"]["asr"]
    assert points[0]["der"] == 0.5  # the unchanged model: DER's "no change"
    run = tracker.client.search_runs([tracker.experiment_id])[0]
    history = tracker.client.get_metric_history(run.info.run_id, "s.asr")
    assert [m.step for m in history] == [0, 1]
    arts = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "defense")}
    assert {"defense/s_acc_asr.png", "defense/s_points.json"} <= arts


def test_a_defense_must_return_modules(toy_registry, tmp_path):
    class Broken(WithExtras):
        name = "broken-extras"

        def defend(self, model, clean, ctx):
            return Defended(model, {0.5: "not a model"})

    reg = toy_registry(defenses=[Broken])
    runner = _toy_runner(reg, tmp_path)
    with pytest.raises(Exception, match="breaks the plugin contract"):
        runner.run_cell(Cell("toy", "badnets", "broken-extras", "wrn-16-1", "wrn-16-1", 0))


class WithSide(WithExtras):
    name = "with-side"
    description = "returns the model and a copy of it as the side model 'copy'"

    def defend(self, model, clean, ctx):
        return Defended(model, models={"copy": copy.deepcopy(model)})


def test_the_engine_measures_and_logs_named_side_models(toy_registry, tmp_path, fresh_store):
    from nadbench.engine.tracking import Tracker

    reg = toy_registry(defenses=[WithSide])
    tracker = Tracker(fresh_store(tmp_path), "side")
    runner = _toy_runner(reg, tmp_path, tracker)
    result = runner.run_cell(Cell("toy", "badnets", "with-side", "wrn-16-1", "wrn-16-1", 0))
    assert result["models"] == {"copy": result["before"]}  # the unchanged model, measured like the others
    run = tracker.client.search_runs([tracker.experiment_id])[0]
    assert run.data.metrics["copy.asr"] == result["before"]["asr"]


@pytest.mark.parametrize("side", ["after", "not a name"])
def test_side_models_may_not_take_the_engines_metric_names(toy_registry, tmp_path, side):
    class Clash(WithExtras):
        name = "clash"

        def defend(self, model, clean, ctx):
            return Defended(model, models={side: copy.deepcopy(model)})

    reg = toy_registry(defenses=[Clash])
    runner = _toy_runner(reg, tmp_path)
    with pytest.raises(Exception, match="side model name"):
        runner.run_cell(Cell("toy", "badnets", "clash", "wrn-16-1", "wrn-16-1", 0))


def test_nads_teacher_is_measured_and_is_the_finetuning_baselines_model(toy_registry, tmp_path):
    # Same settings and seed: NAD's teacher is exactly what the finetune defense returns, weight for
    # weight, so NAD can beat finetuning only by going past its own teacher (benchmarks/results/persistence.md).
    from nadbench.engine import apply_defense
    from nadbench.training.subsets import clean_subset

    runner = _toy_runner(toy_registry(), tmp_path,
                         overrides={"finetune": {"epochs": "2"}, "nad": {"epochs": "1", "teacher_epochs": "2"}})
    models = {}
    for name in ("finetune", "nad"):
        cell = Cell("toy", "badnets", name, "wrn-16-1", "wrn-16-1", 0)
        model = runner.backdoored(cell)[0]
        clean = clean_subset(runner.data("toy")[1], runner.plan(cell).clean_share, cell.seed)
        models[name] = apply_defense(runner.keys.configured("defenses", name), model, clean,
                                     runner.defense_context(cell, lambda *a, **k: None))[0]
    finetuned, teacher = models["finetune"].model.state_dict(), models["nad"].models["teacher"].state_dict()
    assert finetuned.keys() == teacher.keys()
    assert all(torch.equal(finetuned[k], teacher[k]) for k in finetuned)
    assert not all(torch.equal(finetuned[k], v) for k, v in models["nad"].model.state_dict().items())
    nad = runner.run_cell(Cell("toy", "badnets", "nad", "wrn-16-1", "wrn-16-1", 0))
    assert set(nad["models"]["teacher"]) == {"acc", "asr", "ra"}  # measured by the engine


def test_a_third_party_spec_declares_its_classifier(toy_registry):
    reg = toy_registry(models=[ModelSpec("tiny", lambda num_classes: Tiny(), classifier_layer="fc")])
    model = build(reg.model("tiny"), reg.dataset("toy"))
    assert classifier_name(model, reg.model("tiny")) == "net.fc"


def test_bench_defend_measures_the_extra_models_too(toy_registry, tmp_path):
    from nadbench.commands.practitioner import UserData, defend_file
    from nadbench.training.models import save_weights

    reg = toy_registry(defenses=[WithExtras])
    spec = reg.model("wrn-16-1")
    save_weights(build(spec, reg.dataset("toy")), tmp_path / "model.safetensors")
    report = defend_file(reg, model_path=tmp_path / "model.safetensors", arch="wrn-16-1",
                         clean=UserData(toy_split(64, 0), 10, "toy"), defense_name="with-extras", overrides={},
                         mean=(0.5,) * 3, std=(0.25,) * 3, test=None, triggered=UserData(toy_split(30, 1), 10, "trig"),
                         target=0, teacher_path=None, teacher_arch=None, seed=0, device=torch.device("cpu"),
                         out=tmp_path / "repaired.safetensors", progress=False)
    points = report["extras"]["points"]
    assert [p["s"] for p in points] == [0.0, 1.0] and {"acc", "asr"} <= set(points[0])
    assert points[0]["acc"] == report["before"]["acc"]


def test_bench_defend_measures_named_side_models(toy_registry, tmp_path):
    from nadbench.training.models import save_weights
    from nadbench.commands.practitioner import UserData, defend_file

    reg = toy_registry(defenses=[WithSide])
    save_weights(build(reg.model("wrn-16-1"), reg.dataset("toy")), tmp_path / "model.safetensors")
    report = defend_file(reg, model_path=tmp_path / "model.safetensors", arch="wrn-16-1",
                         clean=UserData(toy_split(64, 0), 10, "toy"), defense_name="with-side", overrides={},
                         mean=(0.5,) * 3, std=(0.25,) * 3, test=None, triggered=UserData(toy_split(30, 1), 10, "trig"),
                         target=0, teacher_path=None, teacher_arch=None, seed=0, device=torch.device("cpu"),
                         out=tmp_path / "repaired.safetensors", progress=False)
    assert report["models"] == {"copy": report["before"]}


def test_a_grid_pruning_a_model_without_a_classifier_is_refused_before_training(toy_registry):
    from nadbench.contract.config import ConfigError
    from nadbench.engine import check_grid, expand

    reg = toy_registry(models=[ModelSpec("headless", lambda num_classes: Tiny())])
    cells = expand(reg, ["toy"], ["badnets"], ["fine-pruning"], ["headless"], None, [0])
    with pytest.raises(ConfigError, match="'headless' declares none"):
        check_grid(reg, cells, {})
