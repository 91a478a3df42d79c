"""The plugin manager: entry-point discovery, broken plugins, duplicates, hooks with no spec."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from nadbench import Attack, Defense, hookimpl
from nadbench.engine.registry import PluginError, PluginInfo, Registry, get_registry

ROOT = Path(__file__).resolve().parents[1]


def _module(name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _fake_dist(site: Path, dist: str, entry: str, module_name: str, source: str) -> None:
    """A minimal installed distribution: the files pip writes, so importlib.metadata finds it."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[nadbench]\n{entry} = {module_name}\n")
    (site / f"{module_name}.py").write_text(source)


def _bench(*args, pythonpath: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "nadbench.commands.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_builtins_come_through_the_entry_point_group():
    reg = get_registry()
    assert {"badnets"} <= set(reg.names("attacks"))
    assert {"finetune", "nad"} <= set(reg.names("defenses"))
    assert {"wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "wrn-10-2"} <= set(reg.names("models"))
    assert {"cifar10", "gtsrb"} <= set(reg.names("datasets"))
    assert reg.attack("badnets").provider.startswith("nadbench ")
    assert reg.model("wrn-16-1").provider.startswith("nadbench ")
    assert not reg.failed, [p.error for p in reg.failed]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(PluginError, match="valid attacks: .*badnets"):
        get_registry().attack("nope")


class _Dup(Attack):
    name = "badnets"
    Config = get_registry().attack("badnets").Config

    def apply_trigger(self, images):
        return images


def test_builtin_name_is_refused_and_a_failing_plugin_is_rolled_back():
    reg = Registry()
    reg.load_entrypoints()

    class Extra(Defense):
        name = "extra-defense"
        Config = get_registry().defense("finetune").Config

        def defend(self, model, clean, ctx):
            return model

    @hookimpl
    def register_attacks(register):
        register(_Dup)

    @hookimpl
    def register_defenses(register):
        register(Extra)

    info = PluginInfo("dup", "dup_module", "dup-dist 0.1")
    reg.add_plugin(_module("dup_module", register_attacks=register_attacks, register_defenses=register_defenses),
                   info)
    assert info.error is None
    assert info.refused == ["attack 'badnets' refused: the name belongs to a built-in (nadbench 0.1.0); "
                            "the built-in keeps it"]
    assert reg.attack("badnets").provider.startswith("nadbench")  # the original stays
    assert reg.defense("extra-defense").provider == "dup-dist 0.1"  # the plugin's other items register

    @hookimpl
    def register_defenses(register):  # noqa: F811 — a plugin whose second item breaks the contract
        register(Extra)
        register("not a defense")

    bad = PluginInfo("bad", "bad_module", "bad-dist 0.1")
    reg.add_plugin(_module("bad_module", register_defenses=register_defenses), bad)
    assert "expected a subclass of nadbench.Defense" in bad.error
    assert reg.defense("extra-defense").provider == "dup-dist 0.1"  # nothing of the failed plugin is kept


def test_hookimpl_without_spec_is_an_error():
    reg = Registry()

    @hookimpl
    def register_atacks(register):  # misspelled
        pass

    info = PluginInfo("typo", "typo_module", "")
    reg.add_plugin(_module("typo_module", register_atacks=register_atacks), info)
    assert info.error and "register_atacks" in info.error
    reg.pm.check_pending()  # the bad plugin was removed again: the manager is clean


def test_register_checks_types():
    reg = Registry()

    @hookimpl
    def register_attacks(register):
        register("badnets")

    info = PluginInfo("bad", "bad_module", "")
    reg.add_plugin(_module("bad_module", register_attacks=register_attacks), info)
    assert "expected a subclass of nadbench.Attack" in info.error


def test_broken_and_duplicate_entry_points_are_reported_and_skipped(tmp_path):
    _fake_dist(tmp_path, "broken_plugin", "broken", "broken_plugin", "raise ImportError('missing dependency xyz')\n")
    _fake_dist(tmp_path, "dup_plugin", "dup", "dup_plugin",
               "from nadbench import hookimpl\n"
               "from nadbench.plugins.attacks.badnets import BadNets\n"
               "class Again(BadNets):\n    pass\n"
               "@hookimpl\ndef register_attacks(register):\n    register(Again)\n")
    out = _bench("plugins", "--verbose", pythonpath=tmp_path)
    assert out.returncode == 1, out.stderr  # a failed plugin is an error the user should see
    assert "1 plugin(s) failed" in out.stderr
    assert "missing dependency xyz" in out.stderr and "broken_plugin 0.1" in out.stderr
    assert "dup_plugin: attack 'badnets' refused" in out.stderr
    assert "Traceback" in out.stderr
    listed = _bench("list", "attacks", pythonpath=tmp_path)
    assert listed.returncode == 0 and "badnets" in listed.stdout  # the rest keeps working


def test_tutorial_plugin_installs_and_registers(tmp_path):
    """Exactly what the README's plugin tutorial does: pip-install the example package, list it."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(ROOT / "examples" / "nadbench-whitesquare")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    out = _bench("list", "attacks", pythonpath=site)
    assert out.returncode == 0, out.stderr
    assert "whitesquare" in out.stdout and "[nadbench-whitesquare 0.1.0]" in out.stdout
    assert "whitesquare.size=4" in out.stdout
    plugins = _bench("plugins", pythonpath=site)
    assert "nadbench-whitesquare 0.1.0" in plugins.stdout and "register_attacks" in plugins.stdout
