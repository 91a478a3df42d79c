"""Plugin provenance and the plugin contract: built-in names cannot be taken over, third-party
clashes are ambiguous until the user picks one, contract mistakes are named at registration."""
import subprocess
import sys
import types


from nadbench import Attack, Defense, hookimpl, param
from nadbench.engine.registry import PluginInfo, Registry, get_registry

from test_plugins import _bench, _fake_dist

STRIPES = """
from dataclasses import dataclass
from nadbench import Attack, hookimpl, param

@dataclass(frozen=True)
class StripesConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share poisoned", min=0.0, max=1.0)
    rows: tuple[int, ...] = param((0, 2), "rows painted white", min=0, max=31, nonempty=True)

class Stripes(Attack):
    name = "{name}"
    Config = StripesConfig
    description = "{description}"

    def apply_trigger(self, images):
        out = images.clone()
        out[..., list(self.config.rows), :] = 255
        return out

@hookimpl
def register_attacks(register):
    register(Stripes)
"""


def _impostor_site(tmp_path):
    """'aaa-impostor' claims the built-in 'badnets' (and brings a new attack of its own)."""
    site = tmp_path / "site"
    source = STRIPES.format(name="badnets", description="IMPOSTOR").replace(
        "    register(Stripes)", "    register(Stripes)\n    register(Own)")
    source += "\nclass Own(Stripes):\n    name = 'ownattack'\n    description = 'its own attack'\n"
    _fake_dist(site, "aaa_impostor", "impostor", "aaa_impostor", source)
    return site


def test_a_third_party_cannot_take_a_builtin_name(tmp_path):
    site = _impostor_site(tmp_path)
    listed = _bench("list", "attacks", pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if l.strip().startswith("badnets "))
    assert "[nadbench " in line and "IMPOSTOR" not in listed.stdout
    assert "ownattack" in listed.stdout  # the rest of the plugin still registers
    assert "'badnets' refused: the name belongs to a built-in" in listed.stderr
    plugins = _bench("plugins", pythonpath=site)
    assert plugins.returncode == 1 and "aaa_impostor: attack 'badnets' refused" in plugins.stderr
    # bench run warns before anything else (here it then stops at an invalid setting)
    run = _bench("run", "--attacks", "badnets", "--set", "profile.clean_share=0", pythonpath=site)
    assert run.returncode == 2 and "warning: aaa_impostor: attack 'badnets' refused" in run.stderr


def test_two_third_party_plugins_with_one_name_are_ambiguous(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "pkg_a", "stripes_a", "pkg_a_mod", STRIPES.format(name="stripes", description="A"))
    _fake_dist(site, "pkg_b", "stripes_b", "pkg_b_mod", STRIPES.format(name="stripes", description="B"))
    run = _bench("run", "--attacks", "stripes", pythonpath=site)
    assert run.returncode == 2
    assert "attack 'stripes' is ambiguous: provided by pkg_a 0.1 and pkg_b 0.1" in run.stderr
    assert "pkg_a:stripes or pkg_b:stripes" in run.stderr and "NADBENCH_DISABLE_PLUGINS=" in run.stderr
    # choosing one by dist:name is accepted (the run then stops at the invalid setting)
    chosen = _bench("run", "--attacks", "pkg_b:stripes", "--set", "profile.clean_share=0", pythonpath=site)
    assert chosen.returncode == 2 and "Error: profile.clean_share" in chosen.stderr
    # ...and so is blocking the other plugin
    blocked = _bench("list", "attacks", pythonpath=site, env={"NADBENCH_DISABLE_PLUGINS": "pkg_a"})
    line = next(l for l in blocked.stdout.splitlines() if l.strip().startswith("stripes "))
    assert "[pkg_b 0.1]" in line and "ambiguous" not in blocked.stderr
    plugins = _bench("plugins", pythonpath=site, env={"NADBENCH_DISABLE_PLUGINS": "pkg_a"})
    assert "disabled by NADBENCH_DISABLE_PLUGINS" in plugins.stdout


def test_empty_tuple_for_a_nonempty_field_is_refused(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "pkg_s", "stripes", "pkg_s_mod", STRIPES.format(name="stripes", description="S"))
    run = _bench("run", "--attacks", "stripes", "--set", "stripes.rows=", pythonpath=site)
    assert run.returncode == 2 and "stripes.rows is empty: it needs at least one value" in run.stderr


def test_editing_a_plugin_changes_its_source_hash(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "pkg_s", "stripes", "pkg_s_mod", STRIPES.format(name="stripes", description="S"))
    code = "from nadbench.engine.registry import get_registry; print(get_registry().attack('stripes').source_hash)"

    def source_hash():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(site)})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first = source_hash()
    assert first == source_hash()  # stable
    module = site / "pkg_s_mod.py"
    module.write_text(module.read_text().replace("= 255", "= 254"))
    assert source_hash() != first


def _module(name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _register_attack(cls):
    @hookimpl
    def register_attacks(register):
        register(cls)
    return register_attacks


def _error_of(cls, kind="attacks") -> str:
    reg = Registry()
    info = PluginInfo("bad", "bad_module", "bad-dist 0.1")

    @hookimpl
    def register_defenses(register):
        register(cls)
    hook = {"register_attacks": _register_attack(cls)} if kind == "attacks" else {"register_defenses": register_defenses}
    reg.add_plugin(_module("bad_module", **hook), info)
    assert info.error and cls.name not in reg.names(kind)
    return info.error


def test_contract_checked_at_registration():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoTarget:
        poison_rate: float = param(0.1, "share")

    class A(Attack):
        name = "notarget"
        Config = NoTarget

        def apply_trigger(self, images):
            return images

    assert "its Config has no 'target' field" in _error_of(A)

    @dataclass(frozen=True)
    class ListField:
        target: int = 0
        poison_rate: float = 0.1
        rows: list = None

    ListField.__dataclass_fields__["rows"].default = [1, 2]  # a mutable default the dataclass would refuse

    class B(A):
        name = "listfield"
        Config = ListField

    assert "config field 'rows' holds list" in _error_of(B)

    class C(Attack):
        name = "notrigger"
        Config = get_registry().attack("badnets").Config

    assert "does not implement apply_trigger" in _error_of(C)

    class D(A):
        name = "bad,name"
        Config = get_registry().attack("badnets").Config

    assert "name 'bad,name' is invalid" in _error_of(D)


def test_unknown_name_mentions_failed_plugins(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "broken_stripes", "stripes", "broken_stripes", "import no_such_module_xyz\n")
    run = _bench("run", "--attacks", "stripes", pythonpath=site)
    assert run.returncode == 2 and "unknown attack 'stripes'" in run.stderr
    assert "1 plugin(s) failed to load: stripes (ModuleNotFoundError" in run.stderr


def test_a_profile_sets_only_the_fields_a_defense_declares_and_the_engine_applies_them(toy_registry, tmp_path):
    """A Runner built in code (not only `bench run`) applies the quick profile's finetuning lr to the
    defenses that declare it, and to nothing else: a FinetuneParams config that does not declare it
    keeps its own lr, and a declared field of another name takes its own profile value."""
    import torch
    from dataclasses import dataclass

    from nadbench.engine import Runner, profile
    from nadbench.training.train import FinetuneParams

    @dataclass(frozen=True)
    class ThirdConfig(FinetuneParams):
        rounds: int = param(9, "rounds")

    class Undeclared(Defense):  # a FinetuneParams config whose lr the profile must leave alone
        name = "undeclared"
        Config = ThirdConfig

        def defend(self, model, clean, ctx):
            return model

    class Declared(Undeclared):
        name = "declared"
        profile_settings = {"lr": "finetune_lr", "rounds": {"quick": 2}}

    reg = toy_registry(defenses=[Undeclared, Declared])
    quick = Runner(reg, profile("quick"), device=torch.device("cpu"), cache_dir=tmp_path)
    paper = Runner(reg, profile("paper"), device=torch.device("cpu"), cache_dir=tmp_path)
    assert quick.keys.configured("defenses", "undeclared").config.lr == 0.1  # its own default
    assert (quick.keys.configured("defenses", "declared").config.lr, quick.keys.configured("defenses", "declared").config.rounds) == (0.03, 2)
    assert (paper.keys.configured("defenses", "declared").config.lr, paper.keys.configured("defenses", "declared").config.rounds) == (0.1, 9)
    for name in ("finetune", "nad", "fine-pruning", "mcr"):
        assert quick.keys.configured("defenses", name).config.lr == 0.03 and paper.keys.configured("defenses", name).config.lr == 0.1
    mine = Runner(reg, profile("quick"), device=torch.device("cpu"), cache_dir=tmp_path,
                  overrides={"defense.nad": {"lr": "0.5"}})
    assert mine.keys.configured("defenses", "nad").config.lr == 0.5  # the user's --set wins
    from click.testing import CliRunner

    from nadbench.commands.cli import main
    listed = CliRunner().invoke(main, ["list", "defenses"]).stdout
    assert "finetune.lr=0.1  initial learning rate (in [0.0, 10.0]) [profile quick: 0.03]" in listed


def test_profile_settings_that_name_no_field_are_refused():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class C:
        lr: float = param(0.1, "lr")

    class D(Defense):
        name = "d"
        Config = C
        profile_settings = {"learning_rate": "finetune_lr"}

        def defend(self, model, clean, ctx):
            return model

    assert "profile_settings names 'learning_rate'" in _error_of(D, "defenses")
    D.profile_settings = {"lr": "no_such_profile_field"}
    assert "is not a profile field" in _error_of(D, "defenses")


def test_list_profile_shows_the_fields():
    out = _bench("list", "profile")
    assert out.returncode == 0
    assert "finetune_lr" in out.stdout and "clean_share" in out.stdout and "quick" in out.stdout
