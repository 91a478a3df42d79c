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
from nadbench.api import DefenseContext
from nadbench.engine import Cell, Runner, expand, profile
from nadbench.registry import get_registry
from nadbench.store import Store, stage_key


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
    out = subprocess.run([sys.executable, "-m", "nadbench.cli", "run", "--defenses", "finetune",
                          "--teachers", "wrn-16-2"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--teachers applies to defenses that use a teacher (nad)" in out.stderr


# ------------------------------------------------------------------------------------------ keys
def test_stage_keys_follow_the_inputs_that_matter(registry, tmp_path, monkeypatch):
    base = _runner(registry, tmp_path)

    def keys(runner, cell=CELL):
        poison = runner.poison_key(cell)[0]
        return poison, runner.train_key(cell.dataset, cell.student, cell.seed, poison)[0], runner.cell_key(cell)[0]

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
    monkeypatch.setenv("NADBENCH_PRECISION", "bf16")
    p, t, c = keys(base)
    assert p == p0 and t != t0 and c != c0
    monkeypatch.delenv("NADBENCH_PRECISION")
    # the attack's config and code change the poisoning and everything after it
    for runner in (_runner(registry, tmp_path, {"badnets": {"poison_rate": "0.2"}}),):
        assert len({keys(runner)[i] for i in range(3)} & {p0, t0, c0}) == 0
    monkeypatch.setattr(registry.attack("badnets"), "source_hash", "edited")
    assert len(set(keys(base)) & {p0, t0, c0}) == 0
    monkeypatch.undo()
    # a model's code changes the model, not the poisoning
    model = registry.model
    monkeypatch.setattr(registry, "model", lambda name: dataclasses.replace(model(name), source_hash="edited"))
    p, t, _ = keys(base)
    assert p == p0 and t != t0
    monkeypatch.undo()
    # seeds and students: BadNets' poisoning is shared by architectures, Trojan's (crafted against
    # the student's clean model) is not; the seed changes all
    other = dataclasses.replace(CELL, student="wrn-16-2", teacher="wrn-16-2")
    assert base.poison_key(other) == base.poison_key(CELL)
    trojan = dataclasses.replace(CELL, attack="trojan")
    assert base.poison_key(dataclasses.replace(trojan, student="wrn-16-2")) != base.poison_key(trojan)
    assert _runner(registry, tmp_path, epochs="2").poison_key(trojan) != base.poison_key(trojan)
    assert len(set(keys(base, dataclasses.replace(CELL, seed=1))) & {p0, t0, c0}) == 0
    # the teacher: its architecture and source change the cell, not the student's model
    for teacher in (dataclasses.replace(CELL, teacher="wrn-16-2"), dataclasses.replace(CELL, teacher_source="scratch")):
        p, t, c = keys(base, teacher)
        assert (p, t) == (p0, t0) and c != c0
    assert base.teacher_key(CELL) is None
    assert base.teacher_key(dataclasses.replace(CELL, teacher="wrn-16-2")) == \
        base.train_key("toy", "wrn-16-2", 0, p0)[0]


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
        import nadbench.models as m
        m.save_file = stuck
        from nadbench.store import Store
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
    from nadbench.registry import PluginError

    monkeypatch.setattr(registry.attack("trojan"), "uses_clean_model", False)
    with pytest.raises(PluginError, match="does not declare uses_clean_model = True"):
        _runner(registry, tmp_path).poisoning(dataclasses.replace(CELL, attack="trojan"))


# ------------------------------------------------------------------------------ the defense's view
def test_a_defense_context_offers_no_data_and_the_supplied_models(registry, tmp_path):
    runner = _runner(registry, tmp_path)
    pair = dataclasses.replace(CELL, teacher="wrn-16-2")
    ctx = runner.defense_context(pair, lambda *a, **k: None)
    for field in dataclasses.fields(DefenseContext):
        value = getattr(ctx, field.name)
        assert not isinstance(value, (DatasetSpec, Split)) and not hasattr(value, "load"), field.name
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
    key = runner.teacher_key(dataclasses.replace(CELL, teacher="wrn-16-2"))
    assert (tmp_path / "models" / f"{key}.safetensors").exists()


def test_stage_key_text_is_the_canonical_json():
    key, text = stage_key("x", {"b": 1, "a": [1, 2]})
    assert key == stage_key("x", {"a": [1, 2], "b": 1})[0] and '"core"' in text and len(key) == 24


# ------------------------------------------------------------------------------------- heartbeats
def test_runs_of_another_host_are_reaped_only_without_a_recent_heartbeat(tmp_path):
    import time

    from nadbench.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'nadbench.db'}")
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
