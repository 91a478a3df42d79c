"""Named variants of attacks and defenses (``NAME@bb``, ``NAME@all2all``, combined in any order under
one canonical spelling): what each starts from, how they combine, the error for an unknown one, and
that a variant is its own cell with its own stage keys. No training: configs, cells and keys only."""
import importlib.util
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from nadbench import TARGET_MODES, Attack, hookimpl, param
from nadbench.commands.cli import _parse_sets, main
from nadbench.engine import expand
from nadbench.engine.grid import Cell, profile
from nadbench.engine.plan import Keys, configured
from nadbench.engine.registry import PluginError, PluginInfo, check_contract


def _keys(reg, overrides=None):
    return Keys(reg, profile("quick"), "cpu", "float32", overrides or {}, False,
                lambda name: {"train": f"{name}-train", "test": f"{name}-test"})


def test_bb_starts_from_backdoorbenchs_settings_and_the_plain_names_keep_the_authors(toy_registry):
    """BackdoorBench f02e3534645f: config/attack/sig/default.yaml (sig_delta 40, attack_target 0,
    pratio 0.1 drawn from the target class: all of it on CIFAR-10), config/attack/bpp/default.yaml
    (pratio 0.1, neg_ratio 0.1), config/attack/ftrojannn/default.yaml (magnitude 30, target 0, pratio
    0.1, the trigger in the stored images as the authors'), config/attack/refool/default.yaml (pratio
    0.1, dirty-label, target 0, alpha_t 0.4), config/defense/i-bau/cifar10.yaml (Adam lr
    0.0001, batch 256)."""
    reg = toy_registry()
    expected = {
        ("attacks", "sig"): ({"delta": 40.0, "target": 0, "poison_rate": 1.0},
                             {"delta": 20.0, "target": 5, "poison_rate": 0.5, "freq": 6.0}),
        ("attacks", "bppattack"): ({"poison_rate": 0.1, "negative_rate": 0.1},
                                   {"poison_rate": 0.2, "negative_rate": 0.2, "squeeze": 8}),
        ("attacks", "ftrojan"): ({"magnitude": 30.0, "target": 0, "poison_rate": 0.1, "after_augmentation": False},
                                 {"magnitude": 20.0, "target": 8, "poison_rate": 0.02, "after_augmentation": False}),
        ("attacks", "refool"): ({"target": 0, "poison_rate": 0.1, "clean_label": False, "alpha_t": 0.4},
                                {"target": 5, "poison_rate": 0.4, "clean_label": True, "alpha_t": None}),
        ("defenses", "i-bau"): ({"lr": 0.0001, "batch_size": 256}, {"lr": 0.001, "batch_size": 100}),
    }
    for (kind, name), (bb, plain) in expected.items():
        at_bb = configured(reg, kind, f"{name}@bb").config
        assert {k: getattr(at_bb, k) for k in bb} == bb, name
        assert {k: getattr(configured(reg, kind, name).config, k) for k in plain} == plain, name
    # the values the methods' declared deviations give as BackdoorBench's (docs/fidelity.md)
    declared = (("attacks", "sig", "delta", "40"), ("attacks", "bppattack", "injection / negative rate", "0.1 / 0.1"),
                ("attacks", "ftrojan", "magnitude", "30"), ("defenses", "i-bau", "outer lr", "Adam 0.0001"),
                ("defenses", "i-bau", "batch size", "256"))
    for kind, name, setting, bb in declared:
        assert {d.setting: d.bb for d in reg.get(kind, name).deviations}[setting] == bb
    # the profile still wins over a variant's defaults (I-BAU's 3 rounds on quick)
    assert configured(reg, "defenses", "i-bau@bb", prof=profile("quick")).config.rounds == 3


def test_bb_combines_with_all2all_in_any_order_as_one_cell(toy_registry):
    reg = toy_registry()
    for name in ("bppattack@bb@all2all", "bppattack@all2all@bb"):
        cfg = configured(reg, "attacks", name).config
        assert (cfg.target_mode, cfg.poison_rate, cfg.negative_rate) == ("all2all", 0.1, 0.1)
        assert reg.canonical("attacks", name) == "bppattack@bb@all2all"
    cfg = configured(reg, "attacks", "ftrojan@all2all@bb").config
    assert (cfg.target_mode, cfg.magnitude, cfg.after_augmentation) == ("all2all", 30.0, False)
    cells = expand(reg, ["toy"], ["bppattack@all2all@bb", "bppattack@bb@all2all", "bppattack"], ["finetune"],
                   ["wrn-16-1"], None, [0])
    assert [c.attack for c in cells] == ["bppattack@bb@all2all", "bppattack"]
    # --set: to the plain name, to a variant alone, to the cell's own spelling (any order), most specific last
    sets = {"attack.bppattack": {"squeeze": "4"}, "attack.bppattack@bb": {"negative_rate": "0.3"},
            "attack.bppattack@bb@all2all": {"poison_rate": "0.15"}}
    cfg = configured(reg, "attacks", "bppattack@all2all@bb", sets).config
    assert (cfg.squeeze, cfg.negative_rate, cfg.poison_rate, cfg.target_mode) == (4, 0.3, 0.15, "all2all")
    plain = configured(reg, "attacks", "bppattack", sets).config
    assert (plain.squeeze, plain.negative_rate, plain.poison_rate) == (4, 0.2, 0.2)
    grid = {"attacks": ["bppattack@bb@all2all"], "defenses": ["i-bau@bb"]}
    _, parsed = _parse_sets(("bppattack@all2all@bb.poison_rate=0.15", "bppattack@bb.negative_rate=0.3",
                             "i-bau@bb.lr=0.01"), reg, grid)
    assert parsed == {"attack.bppattack@bb@all2all": {"poison_rate": "0.15"},
                      "attack.bppattack@bb": {"negative_rate": "0.3"}, "defense.i-bau@bb": {"lr": "0.01"}}
    # where two variants set one field, the target variant's value wins
    reg = _with_attack(toy_registry(), {"bb": {"poison_rate": 0.1, "size": 2}, "all2all": {"poison_rate": 0.4}})
    cfg = configured(reg, "attacks", "twovar@all2all@bb").config
    assert (cfg.poison_rate, cfg.size, cfg.target_mode) == (0.4, 2, "all2all")


def test_an_unknown_variant_is_a_one_line_error_naming_the_valid_ones(toy_registry):
    reg = toy_registry()
    for kind, name, valid in (("attacks", "sig@all2all", "valid variants of sig: @bb"),
                              ("attacks", "bppattack@nope", "valid variants of bppattack: @bb, @all2all"),
                              ("attacks", "sig@bb@bb", "valid variants of sig: @bb"),
                              ("defenses", "i-bau@all2all", "valid variants of i-bau: @bb"),
                              ("defenses", "finetune@bb", "valid variants of finetune: (none)")):
        with pytest.raises(PluginError) as exc:
            configured(reg, kind, name)
        assert valid in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    res = CliRunner().invoke(main, ["list", "sig@nope"])
    assert res.exit_code == 2 and "valid variants of sig: @bb" in res.output


def test_a_defense_variant_is_its_own_cell_and_every_variant_its_own_stage_keys(toy_registry):
    reg = toy_registry()
    cells = expand(reg, ["toy"], ["sig", "sig@bb"], ["i-bau", "i-bau@bb"], ["wrn-16-1"], None, [0])
    assert [(c.attack, c.defense) for c in cells] == [("sig", "i-bau"), ("sig", "i-bau@bb"),
                                                      ("sig@bb", "i-bau"), ("sig@bb", "i-bau@bb")]
    keys = _keys(reg)
    plans = {(c.attack, c.defense): keys.plan(c) for c in cells}
    assert plans["sig", "i-bau@bb"].defense.config.lr == 0.0001
    assert plans["sig", "i-bau"].key != plans["sig", "i-bau@bb"].key          # the defense's variant
    assert plans["sig", "i-bau"].poison == plans["sig", "i-bau@bb"].poison    # one backdoored model for both
    assert plans["sig", "i-bau"].poison != plans["sig@bb", "i-bau"].poison    # the attack's variant
    assert plans["sig", "i-bau"].student != plans["sig@bb", "i-bau"].student
    for attack in ("bppattack", "bppattack@bb", "bppattack@all2all", "bppattack@bb@all2all"):
        keys.plan(Cell("toy", attack, "i-bau", "wrn-16-1", "wrn-16-1", 0, ""))
    assert len({p.poison for p in keys._plans.values()}) == 2 + 4


def test_bench_list_shows_each_methods_variants():
    out = CliRunner().invoke(main, ["list", "attacks"]).output
    assert "variants: bppattack@bb, bppattack@all2all (combined: bppattack@bb@all2all)" in out
    assert "sig@bb starts from: delta=40.0, target=0, poison_rate=1.0" in out
    assert "badnets@all2all starts from: poison_rate=0.4, epochs=20 on quick" in out
    one = CliRunner().invoke(main, ["list", "i-bau@bb"])
    assert one.exit_code == 0 and "i-bau@bb starts from: lr=0.0001, batch_size=256" in one.output


def test_variant_declarations_are_checked():
    @dataclass(frozen=True)
    class Cfg:
        target: int = param(0, "target")
        poison_rate: float = param(0.1, "rate")

    for bad in ({"BB": {"poison_rate": 0.2}}, {"b.b": {}}, {"all2all": {"poison_rate": 0.2}},
                {"bb": {"target_mode": "all2all"}}, {"bb": {"rate": 0.2}}):
        cls = type("Bad", (Attack,), {"name": "bad", "Config": Cfg, "variant_defaults": bad,
                                      "apply_trigger": lambda self, x: x})
        with pytest.raises(PluginError, match="variant_defaults"):
            check_contract("attacks", cls)


def test_table1_sets_backdoorbenchs_numbers_beside_matching_settings_only(toy_registry):
    spec = importlib.util.spec_from_file_location("table1", Path(__file__).parents[1] / "benchmarks" / "table1.py")
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    reg = toy_registry()
    assert table1.at_bb(reg, "attacks", "sig") == ("sig", False)        # the authors' settings: marked
    assert table1.at_bb(reg, "attacks", "sig@bb") == ("sig", True)
    assert table1.at_bb(reg, "attacks", "badnets") == ("badnets", True)  # no @bb declared
    assert table1.at_bb(reg, "attacks", "bppattack@bb@all2all") is None  # no all-to-all there
    assert table1.at_bb(reg, "defenses", "i-bau") == ("i-bau", False)
    assert table1.at_bb(reg, "defenses", "i-bau@bb") == ("i-bau", True)


def _with_attack(reg, variants):
    @dataclass(frozen=True)
    class Cfg:
        target: int = param(0, "target")
        target_mode: str = param("all2one", "mode", choices=TARGET_MODES)
        poison_rate: float = param(0.1, "rate")
        size: int = param(3, "size")

    cls = type("TwoVar", (Attack,), {"name": "twovar", "Config": Cfg, "variant_defaults": variants,
                                     "apply_trigger": lambda self, x: x})
    module = types.ModuleType("twovar_plugin")
    module.register_attacks = hookimpl(lambda register: register(cls))
    info = PluginInfo("twovar", "twovar_plugin", "twovar-dist 0.1")
    reg.add_plugin(module, info)
    assert info.error is None, info.traceback
    return reg
