"""The grid as content-keyed stages: keys that follow exactly the inputs that matter, a store that
survives concurrent writers and kills, crafted poisonings reused as stored, teacher-student pairs,
and a defense context with nothing that loads data. (End to end: tests/test_resume.py.)"""
import dataclasses
import multiprocessing
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nadbench import DatasetSpec, Split, executors
from nadbench.contract.api import DefenseContext
from nadbench.engine import Cell, Runner, expand, profile
from nadbench.engine.registry import get_registry
from nadbench.engine.store import Store, stage_key


@pytest.fixture(scope="module")
def registry(toy_registry):
    return toy_registry()


def _runner(reg, tmp_path, overrides=None, **prof):
    p = profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0", **prof})
    return Runner(reg, p, device=torch.device("cpu"), progress=False, cache_dir=tmp_path, overrides=overrides)


CELL = Cell("toy", "badnets", "nad", "wrn-16-1", "wrn-16-1", 0)


# ------------------------------------------------------------------------------ teacher-student pairs
def test_teachers_and_sources_multiply_only_teacher_using_defenses():
    reg = get_registry()
    cells = expand(reg, ["cifar10"], ["badnets"], ["finetune", "nad"], ["wrn-16-1"], ["wrn-16-1", "wrn-16-2"],
                   [0], ("supplied", "scratch"))
    nad = [(c.teacher, c.teacher_source) for c in cells if c.defense == "nad"]
    assert sorted(nad) == [("wrn-16-1", "scratch"), ("wrn-16-1", "supplied"),
                           ("wrn-16-2", "scratch"), ("wrn-16-2", "supplied")]
    assert [(c.teacher, c.teacher_source) for c in cells if c.defense == "finetune"] == [("wrn-16-1", "")]
    assert reg.defense("nad").uses_teacher and not reg.defense("finetune").uses_teacher
    assert {c.label for c in cells} >= {"cifar10/badnets/nad/wrn-16-1<-wrn-16-2/seed0",
                                        "cifar10/badnets/nad/wrn-16-1(scratch)/seed0"}


def test_teachers_without_a_teacher_using_defense_is_an_error():
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", "run", "--defenses", "finetune",
                          "--teachers", "wrn-16-2"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--teachers applies to defenses that use a teacher (nad)" in out.stderr


# ------------------------------------------------------------------------------------------ keys
def test_stage_keys_follow_the_inputs_that_matter(registry, tmp_path, monkeypatch, run_settings):
    base = _runner(registry, tmp_path)

    def keys(runner, cell=CELL):
        poison = runner.plan(cell).poison[0]
        return poison, runner.keys.model(cell.dataset, cell.student, cell.seed, poison)[0], runner.plan(cell).key[0]

    p0, t0, c0 = keys(base)
    assert keys(_runner(registry, tmp_path)) == (p0, t0, c0)  # stable across runners
    # what changes nothing: the defender's share and the finetuning lr leave poisoning and model alone
    p, t, c = keys(_runner(registry, tmp_path, clean_share="0.1"))
    assert (p, t) == (p0, t0) and c != c0
    p, t, c = keys(_runner(registry, tmp_path, {"nad": {"betas": "1,1,1"}}))
    assert (p, t) == (p0, t0) and c != c0
    assert keys(_runner(registry, tmp_path, {"finetune": {"epochs": "3"}})) == (p0, t0, c0)  # not this cell's
    # training settings change the model, not BadNets' poisoning (it crafts against no model)
    p, t, c = keys(_runner(registry, tmp_path, epochs="2"))
    assert p == p0 and t != t0 and c != c0
    # the numerics (precision) change the model, not the poisoning
    suite = run_settings()
    run_settings(precision="bf16")  # a runner takes the settings in force when it is made
    p, t, c = keys(_runner(registry, tmp_path))
    assert p == p0 and t != t0 and c != c0
    run_settings(precision=suite.precision)
    # the attack's config and code change the poisoning and everything after it
    for runner in (_runner(registry, tmp_path, {"badnets": {"poison_rate": "0.2"}}),):
        assert len({keys(runner)[i] for i in range(3)} & {p0, t0, c0}) == 0
    monkeypatch.setattr(registry.attack("badnets"), "source_hash", "edited")
    assert len(set(keys(_runner(registry, tmp_path))) & {p0, t0, c0}) == 0
    monkeypatch.undo()
    run_settings(precision=suite.precision)
    # a model's code changes the model, not the poisoning
    model = registry.model
    monkeypatch.setattr(registry, "model", lambda name: dataclasses.replace(model(name), source_hash="edited"))
    p, t, _ = keys(_runner(registry, tmp_path))
    assert p == p0 and t != t0
    monkeypatch.setattr(registry, "model", model)
    # seeds and students: BadNets' poisoning is shared by architectures, Trojan's (crafted against
    # the student's clean model) is not; the seed changes all
    other = dataclasses.replace(CELL, student="wrn-16-2", teacher="wrn-16-2")
    assert base.plan(other).poison == base.plan(CELL).poison
    trojan = dataclasses.replace(CELL, attack="trojan")
    assert base.plan(dataclasses.replace(trojan, student="wrn-16-2")).poison != base.plan(trojan).poison
    assert _runner(registry, tmp_path, epochs="2").plan(trojan).poison != base.plan(trojan).poison
    assert len(set(keys(base, dataclasses.replace(CELL, seed=1))) & {p0, t0, c0}) == 0
    # the teacher: its architecture and source change the cell, not the student's model
    for teacher in (dataclasses.replace(CELL, teacher="wrn-16-2"), dataclasses.replace(CELL, teacher_source="scratch")):
        p, t, c = keys(base, teacher)
        assert (p, t) == (p0, t0) and c != c0
    assert base.plan(CELL).teacher is None
    assert base.plan(dataclasses.replace(CELL, teacher="wrn-16-2")).teacher == base.keys.model("toy", "wrn-16-2", 0, p0)


# ------------------------------------------------------------------------------------------ store
def _write_many(root, worker):
    store = Store(root)
    for i in range(30):
        store.save_tensors("s", "k", "the key", {"x": torch.full((2000,), float(worker)), "i": torch.tensor([i])})


def test_two_processes_writing_one_key_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(tmp_path, w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    tensors, meta = Store(tmp_path).load_tensors("s", "k", "the key")
    assert tensors["x"].unique().numel() == 1 and meta["key"] == "the key"  # one writer's whole entry
    assert [f.name for f in (tmp_path / "s").iterdir()] == ["k.safetensors"]  # no temporary files left


def test_a_kill_in_the_middle_of_a_write_leaves_no_entry(tmp_path):
    script = textwrap.dedent(f"""
        import time, torch, safetensors.torch as st
        def stuck(tensors, filename, metadata=None):  # write half a file, then hang
            open(filename, "wb").write(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(600)
        import nadbench.training.models as m
        m.save_file = stuck
        from nadbench.engine.store import Store
        Store({str(tmp_path)!r}).save_tensors("s", "k", "the key", {{"x": torch.zeros(3)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (tmp_path / "s" / "k.safetensors").exists()
    assert Store(tmp_path).load_tensors("s", "k", "the key") is None


def test_a_corrupt_poisoning_is_recomputed_and_a_good_one_never_recrafted(registry, tmp_path, monkeypatch):
    cell = dataclasses.replace(CELL, attack="blend")
    first = _runner(registry, tmp_path).poisoning(cell)
    assert not first.hit and first.images  # blend logs its key
    [path] = (tmp_path / "poison").glob("*.safetensors")

    blend = registry.attack("blend")
    monkeypatch.setattr(blend, "prepare", lambda self, ctx: pytest.fail("a stored poisoning was re-crafted"))
    again = _runner(registry, tmp_path).poisoning(cell)
    assert again.hit
    for a, b in [(first.poisoned.images, again.poisoned.images), (first.poisoned.labels, again.poisoned.labels),
                 (first.index, again.index), (first.triggered.images, again.triggered.images)]:
        assert torch.equal(a, b)
    assert all(torch.equal(first.images[k], again.images[k]) for k in first.images)
    monkeypatch.undo()

    path.write_bytes(path.read_bytes()[:500])
    with pytest.warns(UserWarning, match=f"ignoring cache entry {path}"):
        redone = _runner(registry, tmp_path).poisoning(cell)
    assert not redone.hit and torch.equal(redone.triggered.images, first.triggered.images)
    assert _runner(registry, tmp_path).poisoning(cell).hit


def test_an_undeclared_clean_model_user_is_told_to_declare_it(registry, tmp_path, monkeypatch):
    from nadbench.engine.registry import PluginError

    monkeypatch.setattr(registry.attack("trojan"), "uses_clean_model", False)
    with pytest.raises(PluginError, match="does not declare uses_clean_model = True"):
        _runner(registry, tmp_path).poisoning(dataclasses.replace(CELL, attack="trojan"))


# ------------------------------------------------------------------------------ the defense's view
def _reachable(root) -> set[int]:
    """ids of every object reachable from ``root`` through ``gc.get_referents`` (closures, bound
    objects, containers), not entering modules, classes or module namespaces."""
    import gc
    import types

    namespaces = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type)) or id(obj) in namespaces:
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return seen


def test_a_defense_context_offers_no_data_and_the_supplied_models(registry, tmp_path):
    runner = _runner(registry, tmp_path)
    pair = dataclasses.replace(CELL, teacher="wrn-16-2")
    ctx = runner.defense_context(pair, lambda *a, **k: None)
    for field in dataclasses.fields(DefenseContext):
        value = getattr(ctx, field.name)
        assert not isinstance(value, (DatasetSpec, Split)) and not hasattr(value, "load"), field.name
    # Nothing the context reaches, through its callables' closures too, holds the test split or the
    # ASR set (a closure over the Runner would: its memory holds both).
    _, _, test_set = runner.data("toy")
    triggered = runner.poisoning(pair).triggered
    reachable = _reachable(ctx)
    for name, tensor in (("test images", test_set.images), ("test labels", test_set.labels),
                         ("ASR images", triggered.images), ("ASR labels", triggered.labels)):
        assert id(tensor) not in reachable, f"the defense context reaches the {name}"
    assert ctx.num_classes == 10 and (ctx.student, ctx.teacher) == ("wrn-16-1", "wrn-16-2")
    assert ctx.student_layers == ("net.block1", "net.block2", "net.block3")

    student = ctx.supplied_model("wrn-16-1")
    backdoored = runner.backdoored(pair)[0]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), backdoored.state_dict().values()))
    teacher = ctx.supplied_model("wrn-16-2")  # backdoored by the engine on the same poisoned data
    expected = runner.supplied(pair, "wrn-16-2")[0]
    assert sum(p.numel() for p in teacher.parameters()) > sum(p.numel() for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), expected.state_dict().values()))
    assert ctx.supplied_model("preact-resnet18") is None
    scratch = runner.defense_context(dataclasses.replace(pair, teacher_source="scratch"), lambda *a, **k: None)
    assert scratch.supplied_model("wrn-16-2") is None
    fresh = scratch.build_model("wrn-16-2")
    assert fresh(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_nad_runs_with_a_teacher_of_another_architecture_from_both_sources(registry, tmp_path):
    runner = _runner(registry, tmp_path, {"nad": {"epochs": "1", "teacher_epochs": "1"}}, clean_share="0.5")
    for source in ("supplied", "scratch"):
        cell = dataclasses.replace(CELL, teacher="wrn-16-2", teacher_source=source)
        result = runner.run_cell(cell)
        assert result["status"] == "FINISHED" and result["cell"]["teacher_source"] == source
    # the supplied WRN-16-2 was trained once, on the cell's poisoned data, and stored
    key = runner.plan(dataclasses.replace(CELL, teacher="wrn-16-2")).teacher[0]
    assert (tmp_path / "models" / f"{key}.safetensors").exists()


def test_stage_key_text_is_the_canonical_json():
    key, text = stage_key("x", {"b": 1, "a": [1, 2]})
    assert key == stage_key("x", {"a": [1, 2], "b": 1})[0] and '"stage": "x"' in text and len(key) == 24


# ------------------------------------------------------------------------------------- heartbeats
def test_runs_of_another_host_are_reaped_only_without_a_recent_heartbeat(tmp_path, fresh_store):
    import time

    from nadbench.engine.tracking import Tracker

    tracker = Tracker(fresh_store(tmp_path))
    old = f"{time.time() - 7200:.0f}"
    dead = tracker.start("a grid on a machine that died", tags={"nadbench.host": "elsewhere",
                                                               "nadbench.pid": "123", "nadbench.heartbeat": old})
    alive = tracker.start("a grid on a live machine", tags={"nadbench.host": "elsewhere", "nadbench.pid": "123"})
    tracker._open -= {dead, alive}  # this process does not beat for them: they stand for other machines
    assert tracker.reap(stale_after=3600) == [dead]
    assert tracker.client.get_run(dead).info.status == "KILLED"
    assert "no heartbeat from process 123 on elsewhere" in tracker.client.get_run(dead).data.tags["nadbench.end_reason"]
    assert tracker.client.get_run(alive).info.status == "RUNNING"


def test_cells_per_gpu_alone_runs_cells_in_workers():
    pool = executors.make("inprocess", None, device="cuda", threads=None, cells_per_gpu=2, ray_address=None)
    try:
        assert isinstance(pool, executors.Processes)
    finally:
        pool.close()
    assert executors.make("inprocess", None, device="cpu", threads=None, cells_per_gpu=2, ray_address=None) is None


# ------------------------------------------------------------------------------ keys by content
def _tiny_folder(root, seed):
    """An ImageFolder tree root/tiny/{train,test}/<class>/<n>.png of random images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(10):
            folder = root / "tiny" / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_keys_hold_the_datas_content_not_its_name(toy_registry, tmp_path, monkeypatch):
    """Two data roots with one layout and different images never share a poisoning or a model."""
    from nadbench.training.data import load_imagefolder

    monkeypatch.setenv("NADBENCH_CACHE", str(tmp_path / "cache"))
    reg = toy_registry()
    spec = DatasetSpec("tiny", lambda root: load_imagefolder(root, "tiny"), 10, (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(reg, "dataset", lambda name: spec)
    roots = [_tiny_folder(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 1), ("c", 0))]
    cell = dataclasses.replace(CELL, dataset="tiny")

    def keys(root):
        runner = Runner(reg, profile("quick"), device=torch.device("cpu"), data_root=root, cache_dir=tmp_path)
        poison = runner.plan(cell).poison[0]
        return poison, runner.keys.model("tiny", "wrn-16-1", 0, poison)[0], runner.plan(cell).key[0]

    a, b, c = (keys(root) for root in roots)
    assert not set(a) & set(b)  # other images: every stage recomputed
    assert a == c  # the same images under another folder: the same stages


def test_a_file_a_config_names_is_keyed_by_its_content(registry, tmp_path):
    import numpy as np
    from PIL import Image

    key_image = tmp_path / "key.png"
    cell = dataclasses.replace(CELL, attack="blend")
    keys = []
    for seed in (0, 1, 0):  # a runner plans a cell once (when the grid starts): one runner per content
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(key_image)
        keys.append(_runner(registry, tmp_path, {"blend": {"key_image": str(key_image)}}).plan(cell).poison[0])
    assert keys[0] != keys[1] and keys[0] == keys[2]
    folder = tmp_path / "reflections"

    def refool():
        return _runner(registry, tmp_path, {"refool": {"reflection_folder": str(folder)}})
    _tiny_folder(folder, 0)
    before = refool().plan(dataclasses.replace(CELL, attack="refool")).poison[0]
    _tiny_folder(folder, 1)  # the same names, other pictures
    assert refool().plan(dataclasses.replace(CELL, attack="refool")).poison[0] != before


def test_keys_follow_the_code_each_stage_runs(toy_registry, tmp_path, monkeypatch):
    """An edit to a stage's module (core/engine/stages/: its wiring, e.g. the epochs rule or the seeding
    in engine/stages/train.py) changes exactly the keys of that stage and of those that take its output; an edit
    to core/toolkit/adversarial.py (Trojan's and CL's) re-crafts Trojan's poisoning and not BadNets'; an edit
    to the evaluation re-evaluates cells without retraining any model; an edit to the driver, the CLI,
    tracking, the table or the README changes nothing (there is no version to bump)."""
    from nadbench.engine import codehash

    real = codehash.read_source

    def keys(edited: str | None):  # ``edited``: a path under core/ standing for an edited file
        monkeypatch.setattr(codehash, "read_source", lambda file: real(file) + (
            b"\n# edited" if edited and file.as_posix().endswith(f"core/{edited}") else b""))
        codehash.code_hash.cache_clear()
        runner = _runner(toy_registry(), tmp_path)  # a fresh registry: plugin hashes are taken at load
        out = {}
        for attack in ("badnets", "trojan"):
            cell = dataclasses.replace(CELL, attack=attack)
            plan = runner.plan(cell)
            out[attack] = (plan.poison[0], plan.student[0], plan.key[0])
        return out

    base = keys(None)
    adversarial = keys("toolkit/adversarial.py")
    assert adversarial["badnets"] == base["badnets"]
    assert not set(adversarial["trojan"]) & set(base["trojan"])
    for edited in ("training/evaluate.py", "engine/stages/defend.py"):  # the cell stage: poisonings and models stay
        evaluation = keys(edited)
        for attack in ("badnets", "trojan"):
            assert evaluation[attack][:2] == base[attack][:2] and evaluation[attack][2] != base[attack][2], edited
    for edited in ("training/train.py", "engine/stages/train.py"):  # the loop, the train stage's wiring: models and cells,
        training = keys(edited)                      # and the poisoning crafted against the clean model
        assert training["badnets"][0] == base["badnets"][0], edited
        assert training["badnets"][1] != base["badnets"][1] and training["badnets"][2] != base["badnets"][2]
        assert not set(training["trojan"]) & set(base["trojan"]), edited
    poisoning = keys("engine/stages/poison.py")
    for attack in ("badnets", "trojan"):
        assert not set(poisoning[attack]) & set(base[attack])
    for unrelated in ("commands/cli.py", "commands/tables.py", "engine/tracking.py", "engine/runner.py",
                      "engine/pipeline.py", "engine/plan.py", "engine/executors.py", "engine/record.py", "../README.md"):
        assert keys(unrelated) == base, unrelated
    codehash.code_hash.cache_clear()


# ------------------------------------------------------------------------------ overrides and checks
def test_set_overrides_reach_only_the_plugin_of_their_kind(toy_registry, tmp_path):
    import click
    from dataclasses import dataclass

    from nadbench import Attack, Defense, param
    from nadbench.commands.cli import _parse_sets
    from nadbench.contract.config import ConfigError

    @dataclass(frozen=True)
    class AttackConfig:
        target: int = param(5, "target", min=0)
        poison_rate: float = param(0.1, "rate")
        strength: float = param(1.0, "strength")

    class TwinAttack(Attack):
        name, Config = "twin", AttackConfig

        def apply_trigger(self, images):
            return images

    @dataclass(frozen=True)
    class DefenseConfig:
        strength: float = param(2.0, "strength")

    class TwinDefense(Defense):
        name, Config = "twin", DefenseConfig

        def defend(self, model, clean, ctx):
            return model

    reg = toy_registry(defenses=[TwinDefense])
    reg.items["attacks"]["twin"] = TwinAttack
    grid = {"attacks": ["twin"], "defenses": ["twin"]}
    with pytest.raises(click.BadParameter, match="both an attack and a defense"):
        _parse_sets(("twin.strength=3",), reg, grid)
    _, over = _parse_sets(("attack.twin.strength=3",), reg, grid)
    assert over == {"attack.twin": {"strength": "3"}}
    runner = _runner(reg, tmp_path, over)
    assert runner.keys.configured("attacks", "twin").config.strength == 3.0 and runner.keys.configured("defenses", "twin").config.strength == 2.0
    with pytest.raises(ConfigError, match="ambiguous"):
        _runner(reg, tmp_path, {"twin": {"strength": "3"}}).keys.configured("attacks", "twin")
    _, over = _parse_sets(("badnets.target=0", "nad.epochs=2"), reg, {"attacks": ["badnets"], "defenses": ["nad"]})
    assert over == {"attack.badnets": {"target": "0"}, "defense.nad": {"epochs": "2"}}


def test_a_target_outside_the_datasets_labels_is_refused_before_training(registry):
    from nadbench.contract.config import ConfigError
    from nadbench.engine import check_grid

    cells = expand(registry, ["toy"], ["badnets"], ["finetune"], ["wrn-16-1"], None, [0])
    with pytest.raises(ConfigError, match=r"badnets.target = 10 is out of range for dataset 'toy', which has "
                                          r"10 classes: valid targets are 0..9"):
        check_grid(registry, cells, {"attack.badnets": {"target": "10"}})
    check_grid(registry, cells, {"attack.badnets": {"target": "9"}})
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", "run", "--set", "badnets.target=10"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "badnets.target = 10 is out of range for dataset 'cifar10'" in out.stderr
