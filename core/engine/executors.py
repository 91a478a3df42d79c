"""Schedulers over a grid's stage graph (:func:`nadbench.engine.plan.graph`): local worker processes
(``--workers N``, spread over the visible GPUs) or a Ray cluster (``--executor ray``), and the fused
trainer (``--fused``). In the driver's process without an executor, each cell computes the nodes it
needs on first use, in the graph's order (``run_grid``).

The executors share one scheduler:

1. a stored stage (a clean or backdoored model, a teacher, a poisoning) is submitted once, as soon as
   the nodes it reads are done; a node whose input failed fails with it, without running;
2. a cell is submitted when the nodes it reads are done; the driver opens its MLflow run then. A
   training-time defense's model is trained in its cell's task, which records what it logs;
3. a worker runs the cell with a :class:`~nadbench.engine.tracking.Recorder` and returns the record (params,
   metrics, artifacts as bytes); the driver replays it into the cell's run. Only the driver writes
   to MLflow, and workers share stage outputs through the cache folder (shared storage on a cluster).

A cell's result does not depend on where it ran: the same seeds and the same number of threads per
cell (``--threads``; CPU results shift with it) give the same ACC/ASR in-process, in workers or on Ray.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from . import environment
from ..contract.config import ConfigError
from .plan import Node, graph


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to rebuild the driver's Runner (plain data: it crosses processes)."""

    profile: Any
    settings: Any  # the driver's RunSettings, with the executor's threads per cell
    data_root: str | None
    overrides: dict
    cache_dir: str
    clean_reference: bool
    disabled: tuple[str, ...] = ()  # the plugins the driver's registry left out (NADBENCH_DISABLE_PLUGINS)
    reactivation: bool = False
    fpr: float = 0.05  # the detectors' decision (detection cells)


def spec_of(runner, threads: int | None) -> RunSpec:
    # ``rerun`` stays with the driver: it skips finished cells, and for "all" it has already removed
    # the grid's stored stages, so workers compute each stage once, as usual.
    return RunSpec(runner.profile, runner.settings.replace(device=runner.device.type, threads=threads),
                   str(runner.data_root) if runner.data_root else None, runner.overrides, str(runner.cache_root),
                   runner.clean_reference, tuple(sorted(runner.registry.disabled)), runner.reactivation, runner.fpr)


_RUNNERS: dict[str, Any] = {}


def _runner(spec: RunSpec):
    """One Runner per worker process and spec: its in-memory stages serve the process's later tasks."""
    from .runner import Runner
    from .registry import Registry

    key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if key not in _RUNNERS:
        registry = Registry()
        registry.load_entrypoints(disabled=set(spec.disabled))
        _RUNNERS[key] = Runner(registry, spec.profile, settings=spec.settings, data_root=spec.data_root,
                               overrides=spec.overrides, progress=False, cache_dir=spec.cache_dir,
                               clean_reference=spec.clean_reference, reactivation=spec.reactivation, fpr=spec.fpr)
    return _RUNNERS[key]


def stage_task(spec: RunSpec, node: Node) -> None:
    """Compute (or find stored) one stored stage of the graph in this worker."""
    _runner(spec).compute(node)


def planned(runner, cells: list) -> list[Node]:
    """The graph of the cells whose plans can be made: keys hold the data's digest, and a cell whose
    data cannot be loaded has no plan; it meets the error in its own run."""
    plans = []
    for cell in cells:
        try:
            plans.append(runner.plan(cell))
        except Exception:  # noqa: BLE001 — the cell meets the same error and records it
            pass
    return graph(plans)


def cell_task(spec: RunSpec, cell) -> tuple[dict | None, str | None, list]:
    """Run one cell with a recording tracker; returns (result, error, record)."""
    from .tracking import Recorder

    runner = _runner(spec)
    runner.tracker = recorder = Recorder()
    try:
        return runner.run_cell(cell, run_id="worker"), None, recorder.ops
    except Exception as exc:  # recorded (error.txt, FAILED) in recorder.ops; the grid goes on
        return None, f"{type(exc).__name__}: {exc}", recorder.ops
    finally:
        runner.tracker = None


def _init_worker(slots) -> None:
    """A local worker: ignore Ctrl-C (the driver ends the grid and stops the workers), and take one
    GPU slot before CUDA starts (``CUDA_VISIBLE_DEVICES``), so workers spread over the GPUs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slot = slots.get()
    if slot is not None:
        environment.gpu_slot(slot)


class Executor:
    """Submits tasks and schedules a grid's cells after the models they depend on."""

    describe = "in-process"
    threads: int | None = None

    def submit(self, fn: Callable, *args) -> cf.Future:
        raise NotImplementedError

    def close(self, cancel: bool = False) -> None:
        """Stop the workers (``cancel``: now, abandoning what runs)."""

    def run(self, runner, cells: list, parent: str | None, done: Callable) -> None:
        from .tracking import replay

        t, spec = runner.tracker, spec_of(runner, self.threads)
        nodes = planned(runner, cells)
        ahead = [n for n in nodes if n.stage not in ("cell", "defended")]  # see the module's 2.
        stored = {n.key for n in ahead}
        needs = {n.cell: [k for k in n.needs if k in stored] for n in nodes if n.stage == "cell"}
        futures: dict[Any, cf.Future] = {}

        def ready(keys) -> bool:
            return all(k in futures and futures[k].done() for k in keys)
        waiting, running = list(cells), {}  # running: future -> (cell, run id)
        try:
            while ahead or waiting or running:
                for node in [n for n in ahead if ready(n.needs)]:
                    ahead.remove(node)
                    lost = next((futures[k] for k in node.needs if futures[k].exception() is not None), None)
                    futures[node.key] = lost or self.submit(stage_task, spec, node)
                for cell in [c for c in waiting if ready(needs.get(c, ()))]:
                    waiting.remove(cell)
                    run_id = t.start(cell.label, parent=parent) if t else None
                    running[self.submit(cell_task, spec, cell)] = (cell, run_id)
                pending = [f for f in futures.values() if not f.done()] + list(running)
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED) if pending else ((), ())
                for future in finished:
                    if future in running:
                        cell, run_id = running.pop(future)
                        try:
                            result, error, ops = future.result()
                        except Exception as exc:  # the worker itself died (out of memory, a crash)
                            result, error = None, f"worker lost: {type(exc).__name__}: {exc}"
                            ops = [("tag", "error", error), ("end", "FAILED")]
                        if t:
                            replay(t, run_id, ops)
                        done(cell, result, error)
                    elif future.exception() is not None:
                        tqdm.write(f"a stage failed ({future.exception()}); its cells will record the error",
                                   file=sys.stderr)
        except BaseException:
            for cell, run_id in running.values():  # Ctrl-C / SIGTERM: the open cells end KILLED
                if t:
                    t.tag(run_id, "nadbench.end_reason", "the grid was interrupted")
                    t.end(run_id, "KILLED")
            self.close(cancel=True)
            raise
        self.close()


class Processes(Executor):
    """``--workers N`` local processes (spawned). With CUDA devices visible and ``device`` cuda,
    worker i takes GPU i mod G; ``cells_per_gpu`` K gives G*K workers by default."""

    def __init__(self, workers: int | None, *, device: str, threads: int | None, cells_per_gpu: int = 1):
        gpus = _visible_gpus() if device.startswith("cuda") else []
        self.workers = workers or max(1, len(gpus) * cells_per_gpu)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        self.describe = f"{self.workers} worker processes" + (f" over GPUs {','.join(gpus)}" if gpus else "")
        ctx = multiprocessing.get_context("spawn")
        slots = ctx.Queue()
        for i in range(self.workers):
            slots.put(gpus[i % len(gpus)] if gpus else None)
        self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(slots,))

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def close(self, cancel=False):
        if cancel:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class Ray(Executor):
    """Cells as Ray tasks (``pip install 'nadbench[ray]'``): a local Ray, or the cluster at
    ``address``. Each task asks for ``threads`` CPUs and, on GPU, 1/``cells_per_gpu`` of a GPU.
    Every node must have nadbench and the plugins installed, and see the data root and the cache
    folder at the same paths (shared storage): stage outputs are shared through it."""

    def __init__(self, address: str | None, *, device: str, threads: int | None, cells_per_gpu: int = 1):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'nadbench[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **({} if address else {"num_cpus": os.cpu_count()}))
        self.threads = threads or 1
        self.describe = f"Ray at {address or 'a local Ray'}"
        self.options = {"num_cpus": self.threads,
                        "num_gpus": 1 / cells_per_gpu if device.startswith("cuda") else 0}
        self._remote: dict[Callable, Any] = {}

    def submit(self, fn, *args):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].options(**self.options).remote(*args).future()

    def close(self, cancel=False):
        self.ray.shutdown()


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]


def make(executor: str, workers: int | None, *, device: str, threads: int | None, cells_per_gpu: int,
         ray_address: str | None) -> Executor | None:
    """The executor a `bench run` asked for; None for in-process. ``--cells-per-gpu K`` alone on a
    GPU means G*K workers (it used to run in-process, silently)."""
    if executor == "ray":
        return Ray(ray_address, device=device, threads=threads, cells_per_gpu=cells_per_gpu)
    if executor == "processes" or (workers or 0) > 1 or (cells_per_gpu > 1 and device.startswith("cuda")):
        return Processes(workers, device=device, threads=threads, cells_per_gpu=cells_per_gpu)
    return None


def pretrain_fused(runner, cells: list) -> list[str]:
    """``bench run --fused`` (``run_grid``, for the cells it will run): a scheduler over the cells'
    graph that trains its train nodes in fused groups of one dataset, architecture, schedule and size
    (:mod:`nadbench.training.fused`, :mod:`nadbench.engine.stages.fused`) before the cells run, which then
    find them stored: first the clean models (Trojan and CL craft against them), then the supplier's
    backdoored ones (students and teachers). A model already stored is skipped; one whose attack
    controls training or learns its trigger, and a group whose fused training fails, are left to their
    cells, which train them alone. Returns a line per model left alone, saying why."""
    from ..training import fused
    from ..training.settings import use
    from .stages import train as train_stage

    notes: list[str] = []
    nodes = planned(runner, cells)
    with use(runner.settings):
        _fuse(runner, [fused.Job(n.key, n.cell.dataset, n.arch, n.cell.seed, runner.data(n.cell.dataset)[1],
                                 train_stage.schedule(runner.profile), f"clean {n.arch}")
                       for n in nodes if n.stage == "clean"], notes)
        jobs = []
        for n in (n for n in nodes if n.stage in ("backdoored", "teacher")):
            try:
                poisoning = runner.poisoning(n.cell)
            except Exception:  # noqa: BLE001 — the cell meets the same error and records it
                continue
            attack = poisoning.attack
            if attack.learns_trigger or attack.train_step(poisoning.index, len(poisoning.poisoned)) is not None:
                notes.append(f"{n.cell.attack}/{n.arch}: trained alone, its attack controls training")
                continue
            jobs.append(fused.Job(n.key, n.cell.dataset, n.arch, n.cell.seed, poisoning.poisoned,
                                  train_stage.schedule(runner.profile, attack), f"backdoor {n.arch}"))
        _fuse(runner, jobs, notes)
    return notes


def _fuse(runner, jobs: list, notes: list[str]) -> None:
    """Train the jobs not yet stored, group by group, and store each model as its train stage."""
    import contextlib
    import time

    from ..training import fused
    from .runner import MODELS_DIR
    from .stages import fused as fused_stage

    cache = runner.cache
    for group in fused.groups([j for j in jobs if not cache.has(MODELS_DIR, j.stage[0])], runner.settings.fused_max):
        first = group[0]
        with contextlib.ExitStack() as locks:
            for job in group:
                locks.enter_context(cache.store.lock(MODELS_DIR, job.stage[0]))
            start = time.perf_counter()
            try:
                states = fused_stage.trained_together(
                    runner.registry.model(first.arch), runner.data(first.dataset)[0], [j.data for j in group],
                    [j.seed for j in group], first.optim, runner.device, desc=first.desc, progress=runner.progress)
            except Exception as exc:  # noqa: BLE001 — e.g. an op vmap cannot batch: the cells train alone
                notes += [f"{j.desc} (seed {j.seed}): trained alone, fused training failed: "
                          f"{type(exc).__name__}: {exc}" for j in group]
                continue
            spent = f"{time.perf_counter() - start:.1f}"
            for job, entry in zip(group, states):
                cache.put(MODELS_DIR, job.stage, {k: v.clone() for k, v in entry.items()}, entry,
                          {"seconds": spent, "arch": job.arch, "fused_with": str(len(group))})
