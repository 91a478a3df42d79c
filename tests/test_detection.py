"""The detector plugin kind and its engine: the contract (registration, checked scores, the
engine's decision at a false-positive rate), what a detector may see (no poisoned-row index, no test
labels, clean and triggered inputs mixed in every batch), detection cells in a grid (`bench run
--detectors`, skipped pairs, tables, resuming) and the third-party detector of tests/packages."""
import dataclasses
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY
from nadbench import Detection, DetectionContext, Detector, Split, hookimpl, param
from nadbench.engine.detecting import (checked, detection_metrics, inspect_data, screen_inputs, threshold)
from nadbench.engine.registry import PluginError, PluginInfo

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCE = ROOT / "tests" / "packages" / "nadbench-confidence"
CTX = DetectionContext(device=torch.device("cpu"), num_classes=10, seed=0)


@dataclass(frozen=True)
class _NoConfig:
    scale: float = param(1.0, "a factor", min=0.0)


class _Brightness(Detector):
    """A data detector that reads no model: a row's mean pixel value (enough to tell planted rows)."""

    name = "brightness"
    Config = _NoConfig
    uses_model = False
    seen: list = []

    def detect(self, data, clean, model, ctx):
        type(self).seen.append((data, clean, model, ctx))
        return data.images.float().mean((1, 2, 3)) * self.config.scale


class _Spy(Detector):
    """An input detector that records every batch it is shown and scores by brightness."""

    name = "spy"
    Config = _NoConfig
    level = "input"
    batches: list = []

    def prepare(self, model, clean, ctx):
        self.prepared = (model, clean, ctx)

    def score(self, model, images):
        type(self).batches.append(images.clone())
        return images.float().mean((1, 2, 3))


def _confidence():
    """tests/packages/nadbench-confidence's module, imported from its file."""
    if "nadbench_confidence" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nadbench_confidence",
                                                      CONFIDENCE / "nadbench_confidence" / "__init__.py")
        sys.modules["nadbench_confidence"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["nadbench_confidence"])
    return sys.modules["nadbench_confidence"]


def _register(reg, name, **hooks) -> PluginInfo:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    info = PluginInfo(name, name, f"{name}-dist 0.1")
    reg.add_plugin(module, info)
    return info


# ------------------------------------------------------------------------------ the contract

def test_a_detector_is_held_to_the_contract_at_registration(toy_registry):
    reg = toy_registry()

    def broken(**attrs):
        return type("X", (Detector,), {"name": "x", "Config": _NoConfig, **attrs})

    cases = {"level must be one of data, input": broken(level="model", detect=lambda *a: None),
             "data-level detector and does not implement detect()": broken(),
             "an input-level detector and does not implement score()": broken(level="input"),
             "uses_model must be True or False": broken(uses_model=1, detect=lambda *a: None)}
    for message, cls in cases.items():
        info = _register(reg, f"p{len(message)}", register_detectors=lambda register, cls=cls: register(cls))
        assert info.error and message in info.error, (message, info.error)
    thief = type("T", (_Brightness,), {"name": "spectral"})  # a built-in's name is refused, the rest kept
    info = _register(reg, "thief", register_detectors=lambda register: register(thief))
    assert any("'spectral' refused" in line for line in info.refused)
    assert reg.detector("spectral").provider.startswith("nadbench ")
    with pytest.raises(PluginError, match="unknown detector 'nope'; valid detectors: .*spectral"):
        reg.detector("nope")


def test_scores_are_checked_in_one_line_naming_the_plugin():
    det = _Brightness()
    det.provider = "brightness-dist 0.1"
    for out, message in ((torch.zeros(3), r"one score per row \(a tensor of shape \(4,\)\), it returned \(3,\)"),
                         ([0.0] * 4, "it returned list"),
                         (torch.tensor([0.0, float("nan"), 1.0, float("inf")]), "2 of its 4 scores are not finite"),
                         (Detection(torch.zeros(4), torch.zeros(4)), r"must be a bool tensor of shape \(4,\)")):
        with pytest.raises(PluginError, match=message) as err:
            checked(det, out, 4)
        assert str(err.value).startswith("detector 'brightness' (brightness-dist 0.1) breaks the plugin contract")
        assert "\n" not in str(err.value)
    good = checked(det, Detection(torch.arange(4.0), torch.tensor([True, False, False, True])), 4)
    assert good.flagged.tolist() == [True, False, False, True]


def test_the_engines_decision_flags_the_chosen_share_of_clean_scores():
    clean = torch.arange(1000.0)
    cut = threshold(clean, 0.05)
    assert (clean > cut).float().mean() == pytest.approx(0.05, abs=0.002)
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8])
    truth = torch.tensor([False, False, False, True, True])
    metrics = detection_metrics(scores, truth, scores > 0.5)
    assert metrics == {"auroc": 1.0, "tpr": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "fpr": 0.0}
    assert detection_metrics(-scores, truth)["auroc"] == 0.0
    with pytest.raises(ValueError, match="both clean and poisoned"):
        detection_metrics(scores, torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------------------ what a detector sees

def test_a_data_detector_gets_rows_and_labels_only_with_the_clean_share_mixed_in():
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randint(0, 100, (50, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(50) % 10)
    data.images[[3, 17, 40]] = 255  # "poisoned" rows
    clean = Split(torch.randint(0, 100, (20, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    _Brightness.seen = []
    detected = inspect_data(_Brightness(), data, clean, "a model", CTX, fpr=0.05)
    (inspected, given_clean, model, ctx), = _Brightness.seen
    assert model is None  # uses_model = False: the engine passes none
    assert {f.name for f in dataclasses.fields(inspected)} == {"images", "labels"}  # no index of poisoned rows
    assert {f.name for f in dataclasses.fields(ctx)} == {f.name for f in dataclasses.fields(DetectionContext)}
    assert len(inspected) == 70 and given_clean is clean
    both = torch.cat([data.images, clean.images]).flatten(1).float().sum(1).sort().values
    assert torch.equal(inspected.images.flatten(1).float().sum(1).sort().values, both)  # every row, shuffled
    assert not torch.equal(inspected.images[:50], data.images)
    # the scores come back in data's order, the threshold from the clean rows' scores
    assert torch.equal(detected.scores, data.images.float().mean((1, 2, 3)))
    assert detected.flagged.nonzero().flatten().tolist() == [3, 17, 40]
    assert detected.threshold == pytest.approx(threshold(clean.images.float().mean((1, 2, 3)), 0.05))


def test_input_batches_mix_clean_and_triggered_inputs_and_carry_no_label():
    from nadbench.engine.stages.detect import inputs

    g = torch.Generator().manual_seed(1)
    test = Split(torch.randint(0, 100, (300, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(300) % 10)
    triggered = Split(torch.randint(156, 256, (250, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(250) % 10)
    images, truth = inputs(test, triggered, None, seed=0)
    assert (len(images), int(truth.sum())) == (550, 250)
    _Spy.batches = []
    spy = _Spy()
    detected = screen_inputs(spy, "the model", Split(test.images[:40], test.labels[:40]), images, CTX, batch_size=100)
    assert spy.prepared[0] == "the model" and len(spy.prepared[1]) == 40
    shown = _Spy.batches[:6]  # the inputs' batches (then the clean share's, for the threshold)
    assert [len(b) for b in shown] == [100] * 5 + [50]
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.uint8 for b in shown)  # images only, no labels
    for batch in shown:
        bright = batch.float().mean((1, 2, 3)) > 128
        assert 0 < int(bright.sum()) < len(batch), "a batch of one kind only"
    assert detection_metrics(detected.scores, truth)["auroc"] == 1.0
    assert inputs(test, triggered, 100, seed=0)[1].sum() == 100  # detect_inputs: 100 of each


# ------------------------------------------------------------------------------ the grid



@pytest.fixture(scope="module")
def detection_grid(toy_registry, tmp_path_factory, fresh_store):
    """`bench run` on the toy data: BadNets and WaNet x a data detector (reads no model) and the
    third-party input detector, one seed, tiny models of one epoch; tracked in a fresh store."""
    from nadbench.commands.cli import main

    reg = toy_registry(models=[TINY], detectors=[_Brightness])
    info = PluginInfo("confidence", "nadbench_confidence", "nadbench-confidence 0.1.0")
    reg.add_plugin(_confidence(), info)
    assert info.error is None, info.traceback
    folder = tmp_path_factory.mktemp("detect-grid")
    uri = fresh_store(folder)
    args = ["run", "--datasets", "toy", "--attacks", "badnets,wanet", "--detectors", "brightness,confidence",
            "--models", "tiny", "--set", "profile.epochs=1", "--set", "profile.batch_size=16", "--set",
            "profile.crop=0", "--set", "brightness.scale=2", "--tracking-uri", uri, "--no-progress", "--device", "cpu",
            "--output", str(folder / "out.json")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nadbench.engine.registry._REGISTRY", reg)
        mp.setenv("NADBENCH_CACHE", str(folder / "cache"))
        first = CliRunner().invoke(main, args)
        again = CliRunner().invoke(main, args)
        tables = [CliRunner().invoke(main, ["table", "--detectors", "--tracking-uri", uri, *extra])
                  for extra in ([], ["--leaderboard"], ["--format", "json"])]
    return first, again, tables, json.loads((folder / "out.json").read_text())


def test_bench_run_adds_detection_cells_and_skips_data_detectors_on_attacks_that_train(detection_grid):
    first, again, _, out = detection_grid
    assert first.exit_code == 0, first.output
    assert "note: skipped brightness on wanet: wanet runs the training of its model" in first.output
    labels = sorted(r["cell"]["detector"] + "@" + r["cell"]["attack"] for r in out["results"])
    assert labels == ["brightness@badnets", "confidence@badnets", "confidence@wanet"]
    for r in out["results"]:
        assert r["kind"] == "detection" and 0 <= r["detection"]["auroc"] <= 1
        assert set(r["detection"]) == {"auroc", "tpr", "precision", "recall", "f1", "fpr"}
        assert r["own_decision"] is False and r["threshold"] is not None
    data = next(r for r in out["results"] if r["cell"]["detector"] == "brightness")
    assert data["level"] == "data" and data["n_inspected"] == 64 and data["n_positive"] == 6  # 10 % of 64 rows
    assert data["before"] == {}  # reads no model: none was trained for it
    assert data["detector_config"] == {"scale": 2.0}
    inp = next(r for r in out["results"] if r["cell"]["detector"] == "confidence" and r["cell"]["attack"] == "badnets")
    assert inp["level"] == "input" and inp["time_per_input_s"] > 0 and "acc" in inp["before"]
    assert "AUROC / TPR in %" in first.output  # bench run's table
    assert again.exit_code == 0 and "resuming: 3 cell(s) already recorded, 0 to run" in again.output


def test_bench_table_shows_detectors_by_attack_and_ranks_them(detection_grid):
    _, _, (table, board, as_json), out = detection_grid
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[1].split()[:4] == ["dataset", "attack", "brightness", "confidence"]
    wanet = next(line for line in lines if "wanet" in line)
    assert wanet.split()[2] == "-"  # not run: WaNet has no poisoned rows to inspect
    auroc = next(r for r in out["results"] if r["cell"]["detector"] == "brightness")["detection"]["auroc"]
    assert f"{100 * auroc:.2f}" in next(line for line in lines if "badnets" in line)
    assert board.exit_code == 0 and "rank" in board.output and "confidence" in board.output
    assert json.loads(as_json.stdout)["detectors"] == ["brightness", "confidence"]


def test_a_detection_cells_key_holds_what_it_inspects_and_its_detector():
    from nadbench.engine.grid import Cell, profile
    from nadbench.engine.plan import Keys
    from nadbench.engine.registry import get_registry

    reg = get_registry()
    digests = lambda name: {"train": "t", "test": "s"}  # noqa: E731

    def key(cell, fpr=0.05, overrides=None, prof=None):
        return Keys(reg, prof or profile("quick"), "cpu", "float32", overrides or {}, False, digests, False,
                    fpr).plan(cell).key[0]

    cell = Cell("cifar10", "badnets", "-", "wrn-16-1", "wrn-16-1", 0, "", None, "spectral")
    base = key(cell)
    assert key(dataclasses.replace(cell, seed=1)) != base
    assert key(cell, fpr=0.1) != base
    assert key(cell, overrides={"detector.spectral": {"eps": "0.2"}}) != base
    assert key(cell, overrides={"attack.badnets": {"size": "4"}}) != base  # another poisoning
    assert key(dataclasses.replace(cell, detector="strip")) != base
    assert key(cell, prof=profile("quick", {"detect_inputs": "100"})) == base  # a data detector screens no inputs
    strip = dataclasses.replace(cell, detector="strip")
    assert key(strip, prof=profile("quick", {"detect_inputs": "100"})) != key(strip)


# ------------------------------------------------------------------------------ bench detect

def _auroc_of(csv_path: Path, truth: dict[str, bool]) -> float:
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    assert [r["file"] for r in rows] == sorted(truth)  # one row per file, in the folder's order
    return detection_metrics(torch.tensor([float(r["score"]) for r in rows]),
                             torch.tensor([truth[r["file"]] for r in rows]))["auroc"]


def test_bench_detect_round_trip_a_training_set_then_inputs(badnets_detection, tmp_path):
    """The README's two `bench detect` commands, on the fixture's poisoned rows (a folder of PNGs, as a
    practitioner is handed) and on its shuffled clean and triggered test images (a flat folder)."""
    from PIL import Image

    from conftest import FIXTURES
    from nadbench.commands.cli import main
    from nadbench.commands.userfiles import save_image_folder

    f = badnets_detection
    model = str(FIXTURES / "badnets-wrn16-1.safetensors")
    rows = torch.randperm(len(f.data), generator=torch.Generator().manual_seed(5))[:1500].sort().values
    save_image_folder(f.data.subset(rows), tmp_path / "handed-train")
    names = [f"{label}/{i:05d}.png" for i, label in enumerate(f.data.labels[rows].tolist())]
    out = CliRunner().invoke(main, ["detect", model, "--model", "wrn-16-1", "--detector", "spectral", "--data",
                                    str(tmp_path / "handed-train"), "--clean", "cifar10:0.02", "--output",
                                    str(tmp_path / "train-scores.csv"), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "spectral (data level) scored 1500 file(s)" in out.output
    report = json.loads((tmp_path / "train-scores.report.json").read_text())
    assert report["n_clean"] == 1000 and report["model.sha256"] and (tmp_path / "train-scores.scores.png").exists()
    flagged = (tmp_path / "train-scores.flagged.txt").read_text().split()
    assert len(flagged) == report["n_flagged"] > 0
    auroc = _auroc_of(tmp_path / "train-scores.csv", dict(zip(names, f.poisoned[rows].tolist())))
    assert auroc > 0.5, auroc  # a sanity bound: the detector's own effect is tests/test_detectors_data_a.py's

    (tmp_path / "incoming").mkdir()
    for i, image in enumerate(f.inputs[:200]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "incoming" / f"{i:04d}.png")
    out = CliRunner().invoke(main, ["detect", model, "--model", "wrn-16-1", "--detector", "scale-up", "--inputs",
                                    str(tmp_path / "incoming"), "--clean", "cifar10:0.002", "--output",
                                    str(tmp_path / "input-scores.csv"), "--no-progress"])
    assert out.exit_code == 0, out.output
    truth = {f"{i:04d}.png": bool(t) for i, t in enumerate(f.triggered[:200].tolist())}
    assert _auroc_of(tmp_path / "input-scores.csv", truth) > 0.5


def test_bench_detect_refuses_bad_input_in_one_line(tmp_path):
    from conftest import FIXTURES
    from nadbench.commands.cli import main

    model = str(FIXTURES / "badnets-wrn16-1.safetensors")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02not really a pickle")
    cases = [(["--detector", "spectral", "--inputs", str(tmp_path), "--clean", "cifar10:0.01"],
              "spectral is a data-level detector: give --data (and not --inputs)"),
             (["--detector", "strip", "--data", str(tmp_path), "--clean", "cifar10:0.01"],
              "strip is an input-level detector: give --inputs"),
             ([model, "--detector", "strip", "--inputs", str(tmp_path), "--clean", "cifar10:0.01"],
              "MODEL_FILE needs --model ARCH"),
             ([str(tmp_path / "model.pt"), "--model", "wrn-16-1", "--detector", "strip", "--inputs", str(tmp_path),
               "--clean", "cifar10:0.01"], "pickle"),
             (["--detector", "nope", "--inputs", str(tmp_path), "--clean", "cifar10:0.01"], "unknown detector 'nope'"),
             (["--detector", "strip", "--inputs", str(tmp_path / "none"), "--clean", "cifar10:0.01", model, "--model",
               "wrn-16-1"], "no such folder")]
    for args, message in cases:
        out = CliRunner().invoke(main, ["detect", *args])
        assert out.exit_code == 2 and message in out.output and out.output.count("\n") == 1, (args, out.output)


def test_bench_report_shows_a_grid_of_detection_cells(detection_grid, tmp_path):
    from nadbench.commands.cli import main

    first = detection_grid[0]
    uri = next(a for a in first.output.split() if a.startswith("sqlite:///")) if "sqlite:///" in first.output else None
    assert uri, first.output
    out = CliRunner().invoke(main, ["report", "--tracking-uri", uri, "--output", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "r.html").read_text()
    assert "<h3>Detection</h3>" in page and "<h2>Detectors</h2>" in page and "Table 1" not in page
    assert page.count("<details>") == 3 and "AUROC" in page


def test_every_built_in_input_detector_scores_an_input_whatever_its_batch(badnets_detection):
    """Permuting a batch permutes its scores, and an input scores alike alone in a batch of others:
    a score is the input's, not the batch's (each built-in, prepared on a small clean share)."""
    from nadbench.engine.registry import get_registry

    f, reg = badnets_detection, get_registry()
    names = [n for n in reg.names("detectors") if reg.detector(n).level == "input"
             and reg.detector(n).provider.startswith("nadbench ")]
    assert len(names) >= 4, names
    batch, perm = f.inputs[:12], torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for name in names:
        det = reg.detector(name)()
        det.prepare(f.model, f.clean.subset(torch.arange(0, 200, 2)), f.ctx)
        scores = checked(det, det.score(f.model, batch), 12).scores
        again = checked(det, det.score(f.model, batch[perm]), 12).scores
        assert torch.allclose(again, scores[perm], atol=1e-4), name
        alone = checked(det, det.score(f.model, batch[5:6]), 1).scores
        assert torch.allclose(alone, scores[5:6], atol=1e-4), name
