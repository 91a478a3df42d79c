"""The whole extension surface of nadbench: five hooks, each handed a ``register`` callback."""
import pluggy

hookspec = pluggy.HookspecMarker("nadbench")
hookimpl = pluggy.HookimplMarker("nadbench")


@hookspec
def register_datasets(register):
    """Call ``register(DatasetSpec(...))`` once per dataset."""


@hookspec
def register_models(register):
    """Call ``register(ModelSpec(...))`` once per architecture."""


@hookspec
def register_attacks(register):
    """Call ``register(AttackClass)`` once per attack (a subclass of ``nadbench.Attack``)."""


@hookspec
def register_defenses(register):
    """Call ``register(DefenseClass)`` once per defense (a subclass of ``nadbench.Defense``)."""


@hookspec
def register_detectors(register):
    """Call ``register(DetectorClass)`` once per detector (a subclass of ``nadbench.Detector``)."""
