"""The stages as the grid and `bench defend` run them: once per key, and one defend path."""
import torch


def test_each_stage_runs_once_per_key_for_a_grid_that_needs_it_several_times(toy_registry, tmp_path):
    """Two defenses at two clean shares with the clean reference: four cells that need one poisoning,
    one backdoored and one clean model. Counted through the one stage cache, not timed; a second runner
    on the same folder loads each once and computes nothing."""
    from nadbench.engine import MODELS_DIR, POISON_DIR, Runner, expand, run_grid
    from nadbench.engine.grid import profile

    reg, prof = toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    cells = expand(reg, ["toy"], ["badnets"], ["finetune", "fine-pruning"], ["wrn-16-1"], None, [0],
                   clean_shares=[0.05, 0.1])
    assert len(cells) == 4
    first = Runner(reg, prof, progress=False, cache_dir=tmp_path, clean_reference=True)
    results, failures = run_grid(first, cells)
    assert len(results) == 4 and not failures, failures
    counts = first.cache.counts
    assert (counts[POISON_DIR, "computed"], counts[MODELS_DIR, "computed"]) == (1, 2), counts
    assert counts[POISON_DIR, "loaded"] == counts[MODELS_DIR, "loaded"] == 0
    second = Runner(reg, prof, progress=False, cache_dir=tmp_path, clean_reference=True)
    again, _ = run_grid(second, cells)
    assert [r["after"] for r in again] == [r["after"] for r in results]
    counts = second.cache.counts
    assert (counts[POISON_DIR, "loaded"], counts[MODELS_DIR, "loaded"]) == (1, 2), counts
    assert counts[POISON_DIR, "computed"] == counts[MODELS_DIR, "computed"] == 0


def test_bench_defend_and_a_grid_cell_repair_a_model_alike(toy_registry, tmp_path, monkeypatch):
    """The same backdoored model, clean data and seed give the same repaired weights through a grid
    cell and through `bench defend` (``repair.defend_file``): one context builder, one defend path.
    NAD, whose teacher is the supplier's model, reaches the most of the context."""
    import nadbench.engine.stages.defend as defend_stage
    from nadbench.engine import Cell, Runner, run_grid
    from nadbench.engine.grid import profile
    from nadbench.training.models import build, load_weights, save_weights
    from nadbench.engine.plan import config_values
    from nadbench.commands.practitioner import UserData, defend_file

    reg, prof = toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    overrides = {"nad": {"epochs": "1", "teacher_epochs": "1"}}
    in_grid, real = {}, defend_stage.defend

    def spy(defense, model, clean, ctx):
        out = real(defense, model, clean, ctx)
        in_grid.update({k: v.clone() for k, v in out[0].model.state_dict().items()})
        return out
    monkeypatch.setattr(defend_stage, "defend", spy)
    runner = Runner(reg, prof, progress=False, cache_dir=tmp_path, overrides=overrides)
    cell = Cell("toy", "badnets", "nad", "wrn-16-1", "wrn-16-1", 0, "supplied")
    _, failures = run_grid(runner, [cell])
    assert not failures and in_grid, failures
    monkeypatch.setattr(defend_stage, "defend", real)

    save_weights(runner.backdoored(cell).model, tmp_path / "backdoored.safetensors")
    spec, train_set, test_set = runner.data("toy")
    cpu = torch.device("cpu")
    clean = defend_stage.clean_data(train_set, runner.plan(cell).clean_share, 0).to(cpu)
    _, values = config_values(reg, "defenses", "nad", overrides, prof)
    defend_file(reg, model_path=tmp_path / "backdoored.safetensors", arch="wrn-16-1",
                clean=UserData(clean, spec.num_classes, "toy"), defense_name="nad", overrides=values,
                mean=spec.mean, std=spec.std, test=UserData(test_set.to(cpu), spec.num_classes, "toy"),
                triggered=None, target=None, teacher_path=None, teacher_arch=None, seed=0, device=cpu,
                out=tmp_path / "repaired.safetensors", progress=False)
    from_file = load_weights(build(reg.model("wrn-16-1"), spec), tmp_path / "repaired.safetensors").state_dict()
    assert from_file.keys() == in_grid.keys()
    differ = {k: (from_file[k].float() - in_grid[k].float()).abs().max().item() for k in in_grid
              if not torch.equal(from_file[k], in_grid[k])}
    assert not differ, differ


def test_a_learnt_triggers_asr_set_is_armed_once_per_cell(toy_registry, tmp_path, monkeypatch):
    """The ASR set of an attack that learns its trigger comes from the student's stored entry: made once
    per cell, though measuring, the reactivation check and the recording each ask for it."""
    import nadbench.engine.stages.train as train_stage
    from nadbench.engine import Runner, expand
    from nadbench.engine.grid import profile

    reg, prof = toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    calls, real = [], train_stage.armed
    monkeypatch.setattr(train_stage, "armed", lambda *a: calls.append(1) or real(*a))
    runner = Runner(reg, prof, progress=False, cache_dir=tmp_path, reactivation=True,
                    overrides={"iad": {"width": "8"}, "finetune": {"epochs": "1"}})
    [cell] = expand(reg, ["toy"], ["iad"], ["finetune"], ["wrn-16-1"], None, [0])
    result = runner.run_cell(cell)
    assert "asr" in result["after"] and "reactivated" in result
    assert len(calls) == 1


def _graph_grid(toy_registry, tmp_path):
    """BadNets and Trojan (crafted against the clean model) x finetuning, NAD with a supplied teacher of
    another architecture, ABL (a training-time defense) x two clean shares: twelve cells."""
    from nadbench.engine import Runner, expand
    from nadbench.engine.grid import profile

    reg, prof = toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    cells = expand(reg, ["toy"], ["badnets", "trojan"], ["finetune", "nad", "abl"], ["wrn-16-1"], ["wrn-16-2"],
                   [0], clean_shares=[0.05, 0.1])
    return Runner(reg, prof, progress=False, cache_dir=tmp_path), cells


def test_a_grids_graph_holds_each_stored_stage_once_after_what_it_reads(toy_registry, tmp_path):
    """The cells' plans as one graph: each stored stage once however many cells read it, every node
    after the nodes it reads (Trojan's poisoning after the clean model it is crafted against, a NAD
    cell after its teacher, a cell after everything it reads), the cells in the grid's order."""
    import collections

    from nadbench.engine.plan import graph

    runner, cells = _graph_grid(toy_registry, tmp_path)
    nodes = graph(runner.plan(c) for c in cells)
    assert [n.cell for n in nodes if n.stage == "cell"] == cells
    stored = [n for n in nodes if n.stage != "cell"]
    assert len({n.key for n in stored}) == len(stored)
    # ABL's model does not depend on the clean share (it gets no clean data): one per attack
    assert collections.Counter(n.stage for n in stored) == {"clean": 1, "poison": 2, "backdoored": 2,
                                                             "teacher": 2, "defended": 2}
    seen = set()
    for node in nodes:
        assert set(node.needs) <= seen, node
        seen.add(node.key)
    by_key = {n.key: n for n in stored}
    trojan = runner.plan(next(c for c in cells if c.attack == "trojan"))
    assert [by_key[k].stage for k in by_key[trojan.poison].needs] == ["clean"]
    nad = next(n for n in nodes if n.stage == "cell" and n.cell.defense == "nad")
    assert {by_key[k].stage for k in nad.needs} == {"poison", "backdoored", "teacher"}
    assert by_key[runner.plan(nad.cell).teacher].arch == "wrn-16-2"


def test_workers_submit_each_stored_stage_once_after_what_it_reads(toy_registry, tmp_path, monkeypatch):
    """The worker and Ray executors' scheduler over the graph (tasks replaced by recorders, run in
    this thread): each stored stage once, after the stages it reads, every cell after its stages; a
    stage whose input failed fails with it without running, and its cells still run (each records
    the error in its own run). A training-time defense's model trains in its cell."""
    import concurrent.futures as cf

    from nadbench.engine import executors
    from nadbench.engine.plan import Node

    runner, cells = _graph_grid(toy_registry, tmp_path)
    order = []

    def stage_task(spec, node):
        order.append(node)
        if node.stage == "poison" and node.cell.attack == "trojan":
            raise RuntimeError("crafting failed")

    monkeypatch.setattr(executors, "stage_task", stage_task)
    monkeypatch.setattr(executors, "cell_task", lambda spec, cell: order.append(cell) or ({}, None, []))

    class InThread(executors.Executor):
        def submit(self, fn, *args):
            future = cf.Future()
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001
                future.set_exception(exc)
            return future

    ended = []
    InThread().run(runner, cells, None, lambda cell, result, error: ended.append(cell))
    assert sorted(ended, key=cells.index) == cells
    nodes = [n for n in order if isinstance(n, Node)]
    assert len({n.key for n in nodes}) == len(nodes)
    assert {n.stage for n in nodes} == {"clean", "poison", "backdoored", "teacher"}
    assert not [n for n in nodes if n.cell.attack == "trojan" and n.stage in ("backdoored", "teacher")]
    for i, item in enumerate(order):
        before = {n.key for n in order[:i] if isinstance(n, Node)}
        if isinstance(item, Node):
            assert set(item.needs) <= before, item
        elif item.attack == "badnets":  # Trojan's cells ran without what its failed poisoning feeds
            plan = runner.plan(item)
            assert {k for _, k in plan.stored() if k != plan.defended} <= before, item
