"""Shared pytest fixtures. Keep each section small and self-contained."""
import pytest


# ------------------------------------------------------------------------------ dataset cache
@pytest.fixture(scope="session", autouse=True)
def nadbench_cache(tmp_path_factory):
    """One NADBENCH_CACHE for the whole session: tests never write to ~/.cache/nadbench, and the
    real datasets are decoded at most once per run. Tests that need an empty cache monkeypatch
    NADBENCH_CACHE to their own tmp_path."""
    path = tmp_path_factory.mktemp("nadbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NADBENCH_CACHE", str(path))
        yield path
