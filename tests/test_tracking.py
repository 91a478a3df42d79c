"""The tracking store under concurrency: several `bench run` started at once on a new store."""
import subprocess
import sys

# A child: import everything heavy first (so the race is not decided by import times), say
# "ready", wait for the start file, then open the store as `bench run` does and print the id.
CHILD = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store, alembic.command  # noqa: F401 — warm imports
from nadbench.engine.tracking import Tracker
uri, go = sys.argv[1], Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
print(Tracker(uri, "nadbench").experiment_id, flush=True)
"""


def test_new_store_opened_by_concurrent_processes(tmp_path):
    """Four processes open the same NEW SQLite store at the same moment: all succeed (no
    "duplicate column name" from two schema migrations) and share one experiment."""
    uri, go = f"sqlite:///{tmp_path}/nadbench.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate()[1]
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    failures = [err.strip().splitlines()[-1] for p, (_, err) in zip(procs, outs) if p.returncode]
    assert not failures, failures
    ids = {out.split()[-1] for out, _ in outs}
    assert len(ids) == 1, ids
