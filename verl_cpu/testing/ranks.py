"""Multi-process runs on CPU: N ranks on one gloo world, their results (or tracebacks) brought back.

The ranks are ``spawn``-ed interpreters kept in a pool per world size and reused by the next run: starting one
imports torch, Megatron-Core and verl (seconds per rank), which a test session would otherwise pay for every
run. Each run gets the caller's ``sys.path`` and environment, and ends with :func:`destroy_cpu_megatron`, so it
finds a rank as a fresh one would (the ``torch.cuda`` calls keep their CPU meaning, as in the caller). A run
that leaves a rank busy (a timeout, or a rank stuck in a collective after another failed) retires its pool; the
next run spawns a new one.

The rank function must be a module-level function (a rank imports it by name) and calls
``init_cpu_megatron(..., rank=info.rank, world_size=info.world_size, init_method=info.init_method)`` itself,
then ``build_tiny_gpt`` builds this rank's shard / pipeline stage. Whatever it returns is ``torch.save``-d and
handed back to the parent in rank order; an exception in any rank is raised in the parent with every failing
rank's traceback (the other ranks, stuck in a collective, are killed after a grace period).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

from verl_cpu.testing.tiny_gpt import destroy_cpu_megatron, free_port


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """What a rank function gets first: its rank, the world size and the rendezvous address to pass on to
    ``init_cpu_megatron(..., rank=info.rank, world_size=info.world_size, init_method=info.init_method)``."""

    rank: int
    world_size: int
    init_method: str


def _log_to(path: str) -> None:
    """This process's stdout and stderr (the file descriptors, for C code too) go to ``path`` from now on."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)


def _run_task(fn_ref: str, info: RankInfo, out_dir: str, args: tuple) -> None:
    """One run in one rank: import ``fn`` by name, run it, save its result or its traceback, mark it done."""
    result_path = os.path.join(out_dir, f"rank{info.rank}.pt")
    _log_to(os.path.join(out_dir, f"rank{info.rank}.log"))
    try:
        module_name, qualname = fn_ref.split(":")
        fn = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        torch.save(fn(info, *args), result_path + ".tmp")
        os.replace(result_path + ".tmp", result_path)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{info.rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            destroy_cpu_megatron()
        open(os.path.join(out_dir, f"rank{info.rank}.done"), "w").close()


def _serve(tasks) -> None:
    """A pooled rank: run the tasks it is sent, each with the caller's ``sys.path`` and environment, until
    ``None``."""
    while (task := tasks.get()) is not None:
        fn_ref, info, out_dir, args, path, environ = task
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)
        _run_task(fn_ref, info, out_dir, args)


class _Pool:
    """``world_size`` spawned ranks waiting for tasks; daemons, so they end with the caller's process."""

    def __init__(self, world_size: int):
        ctx = multiprocessing.get_context("spawn")
        self.tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve, args=(q,), name=f"cpu-rank-{rank}", daemon=True)
                      for rank, q in enumerate(self.tasks)]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def retire(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


_POOLS: dict[int, _Pool] = {}


def _wait(pool: _Pool, out_dir: str, timeout_s: float, grace_s: float) -> str:
    """Wait until every rank marked its task done; ``""``, or why not (then some ranks are still busy)."""
    def marked(rank: int, what: str) -> bool:
        return os.path.exists(os.path.join(out_dir, f"rank{rank}.{what}"))

    deadline, first_failure = time.monotonic() + timeout_s, None
    while not all(marked(rank, "done") for rank in range(len(pool.procs))):
        now = time.monotonic()
        failed = [rank for rank, p in enumerate(pool.procs)
                  if marked(rank, "err") or (not p.is_alive() and not marked(rank, "done"))]
        if failed and first_failure is None:
            first_failure = now
        if first_failure is not None and now > first_failure + grace_s:
            return "killed after another rank failed"
        if now > deadline:
            return f"timed out after {timeout_s:.0f}s"
        time.sleep(0.05)
    return ""


def _tail(path: str, lines: int = 30) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _collect(pool: _Pool, out_dir: str, unfinished: str) -> tuple[list, list[str]]:
    """Each rank's saved result, or why there is none with the end of the rank's output."""
    results, problems = [], []
    for rank, p in enumerate(pool.procs):
        error_path = os.path.join(out_dir, f"rank{rank}.err")
        result_path = os.path.join(out_dir, f"rank{rank}.pt")
        if os.path.exists(result_path) and not os.path.exists(error_path):
            results.append(torch.load(result_path, weights_only=False))
            continue
        if os.path.exists(error_path):
            why = f"raised:\n{_tail(error_path, 200)}"
        elif not p.is_alive():
            why = f"exited with code {p.exitcode} and left no result"
        else:
            why = unfinished
        output = _tail(os.path.join(out_dir, f"rank{rank}.log"))
        problems.append(f"--- rank {rank} {why}\n--- its output ends with:\n{output}")
    return results, problems


def run_cpu_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0, grace_s: float = 15.0
) -> list:
    """Run ``fn(RankInfo, *args)`` on ``world_size`` ranks (pooled processes, see the module doc); return their
    results by rank.

    ``args`` and the results must be picklable (results go through ``torch.save``). The ranks rendezvous at
    ``tcp://127.0.0.1:<free port>``. When a rank fails, the others get ``grace_s`` to fail or finish; the parent
    then raises ``RuntimeError`` carrying every failing rank's traceback. Runs longer than ``timeout_s`` are
    stopped and reported the same way.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        pool = _POOLS[world_size] = _Pool(world_size)
    fn_ref = f"{fn.__module__}:{fn.__qualname__}"
    out_dir = tempfile.mkdtemp(prefix="cpu_ranks_")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    try:
        for rank, tasks in enumerate(pool.tasks):
            tasks.put((fn_ref, RankInfo(rank, world_size, init_method), out_dir, args, list(sys.path),
                       dict(os.environ)))
        unfinished = _wait(pool, out_dir, timeout_s, grace_s)
        results, problems = _collect(pool, out_dir, unfinished)
        if unfinished:  # a rank is still busy, maybe stuck in a collective: these ranks serve no more runs
            _POOLS.pop(world_size).retire()
        if problems:
            raise RuntimeError(f"{fn_ref} failed on {world_size} CPU ranks:\n" + "\n".join(problems))
        return results
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
