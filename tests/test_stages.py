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
