"""Training-time defenses: the defender trains the model on a supplied, partly poisoned set. Their
mechanism on toy data (ABL's isolation, filter-then-retrain's rows, one core loop), the threat
models kept apart, the grid's cells and keys, and `bench train`."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY, _tiny, toy_split
from nadbench import Detection, DetectionContext, Detector, Split, TrainingContext
from nadbench.contract.config import ConfigError
from nadbench.engine.grid import Cell, profile
from nadbench.engine.registry import PluginError
from nadbench.engine.stages import train_defense
from nadbench.plugins.defenses.abl import ABL
from nadbench.plugins.defenses.filter_retrain import FilterRetrain
from nadbench.toolkit.samples import ranked_share, split
from nadbench.training.train import Optim

CPU = torch.device("cpu")
DCTX = DetectionContext(device=CPU, num_classes=10, seed=0)


def planted(n_noise=200, n_easy=20, seed=0):
    """Noise images with labels in turn (nothing to learn) and ``n_easy`` rows carrying a bright corner
    patch, all labelled 0: the rows a model learns first. Returns (set, easy mask)."""
    g = torch.Generator().manual_seed(seed)
    data = toy_split(n_noise + n_easy, seed)
    images, labels = data.images.clone() // 2, data.labels.clone()
    easy = torch.zeros(len(labels), dtype=torch.bool)
    easy[torch.randperm(len(labels), generator=g)[:n_easy]] = True
    images[easy, :, :8, :8] = 255
    labels[easy] = 0
    return Split(images, labels), easy


def toy_context(**fields):
    def fresh():
        torch.manual_seed(0)
        return _tiny(10)
    return TrainingContext(device=CPU, num_classes=10, arch="tiny", seed=0,
                           schedule=Optim(epochs=2, lr=0.05, batch_size=32), build_model=fresh, progress=False,
                           **fields)


class _Marked(Detector):
    """Flags (own decision) the rows whose first pixel is odd; scores are that pixel."""

    name, level, uses_model = "marked", "data", False

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def detect(self, data, clean, model, ctx):
        first = data.images[:, 0, 0, 0]
        return Detection(first.double(), first % 2 == 1)


# ------------------------------------------------------------------------------ mechanism
def test_abl_isolation_isolates_the_rows_learnt_first():
    data, easy = planted()
    abl = ABL(ABL.Config(tuning_epochs=8, batch_size=32, isolation=0.05))
    _, isolated = abl.isolate(data, toy_context())
    assert int(isolated.sum()) == 11  # 5 % of 220 rows
    assert bool(easy[isolated].all()), "a row without the planted pattern was isolated"


def test_lga_ascends_below_gamma_and_flooding_floats_at_it():
    from nadbench.plugins.defenses.abl import LGA

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x, y = torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(model(x), y)  # ln 10 > gamma
    assert torch.isclose(LGA(0.5, False).loss(model, x, y), ce)
    assert torch.isclose(LGA(3.0, False).loss(model, x, y), -ce)  # below gamma: ascent
    assert torch.isclose(LGA(3.0, True).loss(model, x, y), 2 * torch.tensor(3.0) - ce)


def test_filter_retrain_drops_exactly_the_flagged_rows(monkeypatch):
    import nadbench.plugins.defenses.filter_retrain as module

    data = toy_split(60, 3)
    flagged = data.images[:, 0, 0, 0] % 2 == 1
    seen = []
    monkeypatch.setattr(module, "train", lambda model, kept, optim, **kw: seen.append(kept) or model)
    detect = train_defense.detectors_for(FilterRetrain(), {"marked": _Marked()}, data, data.subset(slice(0, 0)),
                                         lambda: None, DCTX)
    FilterRetrain(FilterRetrain.Config(detector="marked")).train(data, data.subset(slice(0, 0)),
                                                                 toy_context(detect=detect))
    assert torch.equal(seen[0].images, data.images[~flagged]) and torch.equal(seen[0].labels, data.labels[~flagged])
    FilterRetrain(FilterRetrain.Config(detector="marked", drop=0.25)).train(data, data, toy_context(detect=detect))
    top = ranked_share(data.images[:, 0, 0, 0].double(), 0.25, highest=True)  # the scores' highest quarter
    assert len(seen[1]) == 45 and torch.equal(seen[1].images, data.images[~top])
    with pytest.raises(PluginError, match="ctx.detect\\('spectral'\\).*uses_detectors"):
        FilterRetrain().train(data, data, toy_context(detect=detect))


@pytest.mark.parametrize("defense", [ABL(ABL.Config(tuning_epochs=1, finetuning_epochs=1, unlearning_epochs=1,
                                                    batch_size=32)),
                                     FilterRetrain(FilterRetrain.Config(detector="marked"))], ids=["abl", "filter"])
def test_each_defense_trains_through_the_core_loop_alone(defense, monkeypatch):
    """Every optimiser step happens inside the core loop: the model a defense returns is the one the last
    call of ``nadbench.training.train.train`` returned, unchanged after it; ABL calls it once per phase."""
    import importlib

    import nadbench.training.train as core

    calls, real = [], core.train

    def counted(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        calls.append({k: v.clone() for k, v in out.state_dict().items()})
        return out
    monkeypatch.setattr(importlib.import_module(type(defense).__module__), "train", counted)
    data, _ = planted()
    detect = train_defense.detectors_for(defense, {"marked": _Marked()}, data, data, lambda: None, DCTX)
    model = defense.train(data, data, toy_context(detect=detect))
    assert len(calls) == (3 if isinstance(defense, ABL) else 1)
    assert all(torch.equal(v, calls[-1][k]) for k, v in model.state_dict().items())


def test_split_and_ranked_share_keep_the_sets_order():
    data = toy_split(10, 0)
    scores = torch.tensor([5., 1., 1., 9., 0., 3., 3., 2., 8., 7.])
    low = ranked_share(scores, 0.3, highest=False)
    assert low.tolist() == [False, True, True, False, True, False, False, False, False, False]
    assert ranked_share(scores, 0.01, highest=True).tolist() == [i == 3 for i in range(10)]  # at least one row
    kept, taken = split(data, low)
    assert torch.equal(kept.labels, data.labels[~low]) and torch.equal(taken.images, data.images[low])


# ------------------------------------------------------------------------------ threat models and the grid
def test_a_training_controlled_attack_with_a_training_time_defense_is_refused_before_training(toy_registry,
                                                                                            monkeypatch):
    from nadbench.commands.cli import _threat_models
    from nadbench.engine.runner import check_grid, expand

    reg = toy_registry(models=[TINY])
    monkeypatch.setattr("nadbench.training.train.train", lambda *a, **k: pytest.fail("trained"))
    for defense in ("abl", "filter-retrain"):
        cells = expand(reg, ["toy"], ["wanet"], [defense], ["tiny"], [], [0])
        with pytest.raises(ConfigError, match=f"defense '{defense}' trains the model.*'wanet' runs the training"):
            check_grid(reg, cells, {}, profile("quick"))
    cells = expand(reg, ["toy"], ["badnets", "wanet"], ["abl", "finetune"], ["tiny"], [], [0])
    kept = _threat_models(reg, cells, {}, profile("quick"), defenses_by_all=("abl", "finetune"))
    assert sorted((c.attack, c.defense) for c in kept) == [("badnets", "abl"), ("badnets", "finetune"),
                                                           ("wanet", "finetune")]
    check_grid(reg, kept, {}, profile("quick"))
    with pytest.raises(ConfigError, match="runs detector 'strip', which screens inputs"):
        check_grid(reg, expand(reg, ["toy"], ["badnets"], ["filter-retrain"], ["tiny"], [], [0]),
                   {"defense.filter-retrain": {"detector": "strip"}}, profile("quick"))


def test_a_training_time_defense_is_held_to_the_contract_at_registration(toy_registry):
    from nadbench import Defense, TrainingDefense

    class NoTrain(TrainingDefense):
        name, Config = "no-train", FilterRetrain.Config

    class Claims(Defense):
        name, Config, trains = "claims", FilterRetrain.Config, True

        def defend(self, model, clean, ctx):
            return model
    for cls, why in ((NoTrain, "does not implement train"), (Claims, "subclass nadbench.TrainingDefense")):
        with pytest.raises(AssertionError, match=why):
            toy_registry(defenses=[cls])


def test_a_training_time_defenses_model_is_keyed_by_its_detectors_and_the_poisoning():
    from nadbench.engine.plan import Keys
    from nadbench.engine.registry import get_registry

    reg = get_registry()
    digests = lambda name: {"train": "t", "test": "s"}  # noqa: E731

    def plan(cell, overrides=None):
        return Keys(reg, profile("quick"), "cpu", "float32", overrides or {}, False, digests).plan(cell)

    cell = Cell("cifar10", "badnets", "filter-retrain", "wrn-16-1", "wrn-16-1", 0)
    base = plan(cell)
    assert base.defended and base.defended[0] in base.key[1] and set(base.detectors) == {"spectral"}
    assert plan(cell, {"detector.spectral": {"eps": "0.2"}}).defended != base.defended
    assert plan(cell, {"attack.badnets": {"size": "4"}}).defended != base.defended
    assert plan(dataclasses.replace(cell, defense="filter-retrain@scan")).defended != base.defended
    assert plan(dataclasses.replace(cell, clean_share=0.1)).defended != base.defended  # its threshold's share
    abl = plan(dataclasses.replace(cell, defense="abl"))
    assert abl.detectors == {} and plan(dataclasses.replace(cell, defense="abl", clean_share=0.1)).defended == \
        abl.defended  # ABL reads no clean data
    assert plan(dataclasses.replace(cell, defense="finetune")).defended is None


@pytest.fixture(scope="module")
def training_grid(toy_registry, tmp_path_factory, fresh_store):
    """`bench run` on the toy data: BadNets x ABL, filter-then-retrain with a third-party detector and
    finetuning, tiny models of one epoch, twice (the second resumes); tracked in a fresh store."""
    from nadbench.commands.cli import main

    reg = toy_registry(models=[TINY], detectors=[_Marked])
    folder = tmp_path_factory.mktemp("train-grid")
    uri = fresh_store(folder)
    args = ["run", "--datasets", "toy", "--attacks", "badnets", "--defenses", "abl,filter-retrain,finetune",
            "--set", "filter-retrain.detector=marked",
            "--models", "tiny", "--set", "profile.epochs=1", "--set", "profile.batch_size=16", "--set",
            "abl.tuning_epochs=1", "--set", "abl.finetuning_epochs=1", "--set", "abl.unlearning_epochs=1",
            "--set", "abl.isolation=0.1", "--reactivation", "--tracking-uri", uri, "--no-progress", "--device", "cpu",
            "--output", str(folder / "out.json")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nadbench.engine.registry._REGISTRY", reg)
        mp.setenv("NADBENCH_CACHE", str(folder / "cache"))
        first = CliRunner().invoke(main, args)
        again = CliRunner().invoke(main, args + ["--rerun", "cells"])
        table = CliRunner().invoke(main, ["table", "--tracking-uri", uri])
    return first, again, table, json.loads((folder / "out.json").read_text()), folder


def test_bench_run_reports_training_time_defenses_as_every_defense(training_grid):
    first, again, table, out, folder = training_grid
    assert first.exit_code == 0, first.output
    rows = {r["cell"]["defense"]: r for r in out["results"]}
    assert set(rows) == {"abl", "filter-retrain", "finetune"}
    for name in ("abl", "filter-retrain"):
        r = rows[name]
        assert set(r["after"]) >= {"acc", "asr", "ra", "der"} and "reactivated" in r
        assert r["before"] == rows["finetune"]["before"]  # the plainly trained model of the same poisoning
    assert rows["abl"]["n_clean"] == 0 and rows["filter-retrain"]["n_clean"] > 0
    assert len(list((folder / "cache" / "models").glob("*.safetensors"))) >= 3  # plain + the two defenses' own
    assert again.exit_code == 0, again.output
    again_rows = {r["cell"]["defense"]: r for r in json.loads((folder / "out.json").read_text())["results"]}
    assert again_rows["abl"]["after"] == rows["abl"]["after"]  # the stored model, measured again
    # what each defense logged without a step is stored with its model: the rerun reports it too
    assert rows["abl"]["defense_logged"].keys() == {"defense.isolated"}
    assert rows["abl"]["defense_logged"]["defense.isolated"] > 0
    assert rows["filter-retrain"]["defense_logged"].keys() == {"defense.dropped"}
    assert "defense_logged" not in rows["finetune"]
    for name in ("abl", "filter-retrain"):
        assert again_rows[name]["defense_logged"] == rows[name]["defense_logged"], name
    assert table.exit_code == 0 and "abl" in table.output and "filter-retrain" in table.output


# ------------------------------------------------------------------------------ bench train
@pytest.fixture(scope="module")
def handed(tmp_path_factory):
    """A poisoned training set as a practitioner is handed it (BadNets rows among toy images, PNG class
    folders), a test folder and a folder of triggered test images with their targets."""
    from nadbench.commands.userfiles import save_image_folder
    from nadbench.engine.registry import get_registry

    folder = tmp_path_factory.mktemp("handed")
    attack = get_registry().attack("badnets")()
    attack.num_classes = 10
    poisoned, _ = attack.poison_train(toy_split(80, 0), torch.Generator().manual_seed(0))
    save_image_folder(poisoned, folder / "train")
    test = toy_split(30, 1)
    save_image_folder(test, folder / "test")
    triggered = attack.trigger_test(test)
    save_image_folder(triggered, folder / "triggered", targets=attack.targets(triggered.labels))
    return folder


def test_bench_train_round_trip_writes_the_model_and_its_report(handed, toy_registry, tmp_path):
    from nadbench.commands.cli import main
    from nadbench.commands.userfiles import load_model

    reg = toy_registry(models=[TINY], detectors=[_Marked])
    fast = ["--set", "profile.epochs=1", "--set", "profile.batch_size=16", "--no-progress", "--device", "cpu",
            "--tracking-uri", f"sqlite:///{tmp_path / 'runs.db'}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nadbench.engine.registry._REGISTRY", reg)
        out = CliRunner().invoke(main, ["train", "--data", str(handed / "train"), "--model", "tiny", "--defense", "abl",
                                        "--test", str(handed / "test"), "--triggered", str(handed / "triggered"),
                                        "--set", "abl.tuning_epochs=1", "--set", "abl.finetuning_epochs=1",
                                        "--set", "abl.isolation=0.1", "--baseline", "--output",
                                        str(tmp_path / "abl.safetensors"), *fast])
        assert out.exit_code == 0, out.output
        assert "abl: tiny trained on 80 images" in out.output and "(plain training: ACC" in out.output
        report = json.loads((tmp_path / "abl.report.json").read_text())
        assert set(report["after"]) >= {"acc", "asr", "ra", "der"} and report["before"]["asr"] >= 0
        assert report["n_train"] == 80 and report["n_triggered"] == 27  # the target class's 3 left out
        assert report["defense_logged"] == {"defense.isolated": 8.0}  # 10 % of 80, as logged to its run
        load_model(tmp_path / "abl.safetensors", TINY, 10)  # safetensors, loadable as a model
        out = CliRunner().invoke(main, ["train", "--data", str(handed / "train"), "--model", "tiny",
                                        "--defense", "filter-retrain", "--set", "filter-retrain.detector=marked",
                                        "--clean", str(handed / "test"),
                                        "--output", str(tmp_path / "f.safetensors"), *fast])
        assert out.exit_code == 0, out.output
        assert "ACC on a held-out 10%" in out.output  # no --test: a slice of --data kept out of training
        report = json.loads((tmp_path / "f.report.json").read_text())
        assert report["n_train"] == 72 and report["defense_logged"]["defense.dropped"] > 0


@pytest.mark.parametrize("args, message", [
    (["--defense", "finetune"], "finetune repairs a trained model (use bench defend); bench train takes a "
                                "training-time defense: abl, filter-retrain, none"),
    (["--defense", "filter-retrain"], "filter-retrain uses clean data (its detector's threshold): give --clean"),
    (["--defense", "nope"], "valid"),
    (["--model", "nope"], "valid"),
    (["--set", "abl.gamma=x"], "abl.gamma"),
])
def test_bench_train_refuses_bad_input_in_one_line(handed, args, message, tmp_path):
    from nadbench.commands.cli import main

    out = CliRunner().invoke(main, ["train", "--data", str(handed / "train"), "--output",
                                    str(tmp_path / "m.safetensors"), "--no-progress", *args])
    assert out.exit_code == 2 and message in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_bench_defend_refuses_a_training_time_defense_in_one_line(tmp_path):
    from nadbench.commands.cli import main
    from nadbench.training.models import save_weights

    save_weights(_tiny(10), tmp_path / "m.safetensors", {})
    out = CliRunner().invoke(main, ["defend", str(tmp_path / "m.safetensors"), "--model", "wrn-16-1", "--defense",
                                    "abl", "--clean", "cifar10:0.01"])
    assert out.exit_code == 2 and "abl is a training-time defense" in out.output and "bench train" in out.output


# ------------------------------------------------------------------------------ effect on real data
class _Small(torch.nn.Module):
    """A three-block CNN: a real-data model whose training costs the suite seconds (WRN-16-1's, minutes)."""

    def __init__(self):
        super().__init__()

        def block(i, o):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o),
                                       torch.nn.ReLU())
        self.features = torch.nn.Sequential(block(3, 32), torch.nn.MaxPool2d(2), block(32, 64), torch.nn.MaxPool2d(2),
                                            block(64, 128), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.features((x - 0.47) / 0.25))


class _Nothing:
    """The do-nothing training-time defense: plain training on the set as supplied."""

    name, provider, uses_clean_data = "nothing", "test", False

    def train(self, data, clean, ctx):
        from nadbench.training.train import train

        return train(ctx.build_model(), data, ctx.schedule, seed=ctx.seed, progress=False)


# ABL at 5 % poisoning, where its isolation finds the poisoned rows (at 3 % the isolation's precision fell to
# 0 / 0.60 / 0.73 over seeds); filter-then-retrain at 3 %, where Spectral's 1.5 eps per class (eps 0.15) covers
# the poisoned share of the target class and costs every class less data than at 5 % (eps 0.25: up to 9 points
# of ACC). Plain training, ABL's finetuning included, without augmentation: 10 epochs of crop and flip on 4,000
# images do not implant BadNets in this model (ASR 0.16). ABL on 4,000 images, filter-then-retrain on 3,000 (on
# 3,000, ABL's isolation missed the backdoor: ASR 0.37 / 0.47 / 1.00 over seeds).
EFFECT = {"epochs": 10}
ABL_EFFECT = {"n_train": 4000, "poison_rate": 0.05,
              "config": dict(tuning_epochs=5, lr=0.05, batch_size=32, finetuning_epochs=10, milestones=(7,), crop=0,
                             flip=False, cutout=0, unlearning_epochs=8)}
FILTER_EFFECT = {"n_train": 3000, "poison_rate": 0.03, "spectral_eps": 0.15}


@pytest.fixture(scope="module")
def badnets_training(effect_seed):
    """``at(rate, n_train)``: BadNets (3x3 patch, target 5) at that poisoning rate, re-crafted from a fixed
    seed on a seeded ``n_train`` of the fixture models' training images; a small CNN's schedule (onecycle, no
    augmentation) and the do-nothing defense's model (plain training), which filter-then-retrain's detector
    reads; ``.plain`` its metrics and ``.run(defense, detectors)`` a defense's."""
    import functools
    import types

    from conftest import real_subset
    from nadbench.engine.defending import apply_training_defense
    from nadbench.engine.poisoning import seeded
    from nadbench.engine.registry import get_registry
    from nadbench.training.evaluate import evaluate

    reg = get_registry()

    def fresh():
        torch.manual_seed(effect_seed)
        return _Small()
    schedule = Optim(epochs=EFFECT["epochs"], lr=0.05, batch_size=64, schedule="onecycle", weight_decay=5e-4)
    plain_ctx = TrainingContext(device=CPU, num_classes=10, arch="small", seed=effect_seed, schedule=schedule,
                                classifier_layer="fc", build_model=fresh, progress=False)
    dctx = DetectionContext(device=CPU, num_classes=10, seed=effect_seed, arch="small", classifier_layer="fc")

    @functools.cache
    def at(rate, n_train):
        train_set, test_set = real_subset(n_train, 2000)
        none = train_set.subset(slice(0, 0))
        attack = reg.attack("badnets")(reg.attack("badnets").Config(target=5, poison_rate=rate))
        attack.num_classes = 10
        poisoned, _ = attack.poison_train(train_set, seeded(0, "poison"))
        triggered = attack.trigger_test(test_set)

        def measure(model):
            return evaluate(model, test_set, triggered, attack.targets(triggered.labels))
        plain = apply_training_defense(_Nothing(), poisoned, none, plain_ctx)[0].model

        def run(defense, detectors=None):
            detect = train_defense.detectors_for(defense, detectors or {}, poisoned, none, lambda: plain, dctx)
            ctx = dataclasses.replace(plain_ctx, plain_model=lambda: plain, detect=detect)
            return measure(apply_training_defense(defense, poisoned, none, ctx)[0].model)
        return types.SimpleNamespace(run=run, plain=measure(plain))
    return at


def removes(after, plain) -> bool:
    """The issue's bar: ASR at most 0.3 and at most half the plainly trained model's, at most 10 points of ACC."""
    return after["asr"] <= 0.3 and after["asr"] <= plain["asr"] / 2 and plain["acc"] - after["acc"] <= 0.10


def test_abl_trains_a_model_without_the_backdoor(badnets_training, record):
    grid = badnets_training(ABL_EFFECT["poison_rate"], ABL_EFFECT["n_train"])
    after, plain = grid.run(ABL(ABL.Config(**ABL_EFFECT["config"]))), grid.plain
    record(asr=after["asr"], acc=after["acc"], plain_asr=plain["asr"], plain_acc=plain["acc"])
    # seeds 0/1/2 (float32, Xeon AVX512-BF16/AMX): ASR 0.031/0.041/0.131 (plain 0.99/0.99/1.00), ACC drop
    # 4.2/1.9/8.1 points (the bar: 10); the isolated 1 % were all poisoned rows on seeds 0-2 of the experiment
    assert removes(after, plain)
    assert not removes(plain, plain)  # the do-nothing defense fails the same bar


def test_filter_then_retrain_with_spectral_signatures_trains_without_the_backdoor(badnets_training, record):
    from nadbench.plugins.detectors.spectral import Spectral

    grid = badnets_training(FILTER_EFFECT["poison_rate"], FILTER_EFFECT["n_train"])
    spectral = Spectral(Spectral.Config(eps=FILTER_EFFECT["spectral_eps"]))
    after, plain = grid.run(FilterRetrain(), {"spectral": spectral}), grid.plain
    record(asr=after["asr"], acc=after["acc"], plain_asr=plain["asr"], plain_acc=plain["acc"])
    # seeds 0/1/2: ASR 0.105/0.094/0.075 (plain 0.97/0.99/0.99), ACC drop 2.6/3.8/2.9 points
    assert removes(after, plain)
    assert not removes(plain, plain)
