"""Multi-process runs on CPU: spawn N ranks on one gloo world, bring their results (or tracebacks) back.

Each rank is a fresh ``spawn``-ed interpreter; the rank function must be a module-level function (the child
imports it by name, with the parent's ``sys.path``) and calls ``init_cpu_megatron(..., rank=info.rank,
world_size=info.world_size, init_method=info.init_method)`` itself, then ``build_tiny_gpt`` builds this rank's
shard / pipeline stage. Whatever it returns is ``torch.save``-d and handed back to the parent in rank order; an
exception in any rank is raised in the parent with every failing rank's traceback (the other ranks, stuck in
a collective, are killed after a grace period).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import shutil
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


def _rank_entry(fn_ref: str, info: RankInfo, out_dir: str, args: tuple) -> None:
    """Body of one spawned rank: import ``fn`` by name, run it, save its result or its traceback."""
    result_path = os.path.join(out_dir, f"rank{info.rank}.pt")
    error_path = os.path.join(out_dir, f"rank{info.rank}.err")
    try:
        module_name, qualname = fn_ref.split(":")
        fn = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        result = fn(info, *args)
        torch.save(result, result_path + ".tmp")
        os.replace(result_path + ".tmp", result_path)
    except BaseException:
        with open(error_path, "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None  # the traceback travels in the file
    finally:
        with contextlib.suppress(Exception):
            destroy_cpu_megatron()


def _wait(procs: list, timeout_s: float, grace_s: float) -> tuple[list[int], bool]:
    """Wait for the ranks; kill the ones still running ``grace_s`` after a failure or at ``timeout_s``.
    Returns (killed ranks, whether the timeout was hit)."""
    deadline = time.monotonic() + timeout_s
    first_failure = None
    timed_out = False
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
            first_failure = now
        if now > deadline or (first_failure is not None and now > first_failure + grace_s):
            timed_out = now > deadline
            break
        time.sleep(0.05)
    killed = []
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            killed.append(rank)
        p.join(timeout=10)
    return killed, timed_out


def _collect(procs: list, out_dir: str, killed: list[int], why_killed: str) -> tuple[list, list[str]]:
    """Each rank's saved result, or a description of why there is none."""
    results, problems = [], []
    for rank, p in enumerate(procs):
        error_path = os.path.join(out_dir, f"rank{rank}.err")
        result_path = os.path.join(out_dir, f"rank{rank}.pt")
        if os.path.exists(error_path):
            with open(error_path) as f:
                problems.append(f"--- rank {rank} raised (exit code {p.exitcode}):\n{f.read()}")
        elif rank in killed:
            problems.append(f"--- rank {rank} {why_killed}")
        elif p.exitcode != 0 or not os.path.exists(result_path):
            problems.append(f"--- rank {rank} exited with code {p.exitcode} and left no result")
        else:
            results.append(torch.load(result_path, weights_only=False))
    return results, problems


def run_cpu_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0, grace_s: float = 15.0
) -> list:
    """Run ``fn(RankInfo, *args)`` in ``world_size`` freshly spawned processes; return their results by rank.

    ``args`` and the results must be picklable (results go through ``torch.save``). The ranks rendezvous at
    ``tcp://127.0.0.1:<free port>``. When a rank fails, the others get ``grace_s`` to fail or finish and are
    then killed; the parent then raises ``RuntimeError`` carrying every failing rank's traceback. Runs longer
    than ``timeout_s`` are killed and reported the same way.
    """
    fn_ref = f"{fn.__module__}:{fn.__qualname__}"
    ctx = multiprocessing.get_context("spawn")
    out_dir = tempfile.mkdtemp(prefix="cpu_ranks_")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_rank_entry, args=(fn_ref, RankInfo(rank, world_size, init_method), out_dir, args),
                    name=f"cpu-rank-{rank}")
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        killed, timed_out = _wait(procs, timeout_s, grace_s)
        why = f"timed out after {timeout_s:.0f}s" if timed_out else "killed after another rank failed"
        results, problems = _collect(procs, out_dir, killed, why)
        if problems:
            raise RuntimeError(
                f"{fn_ref} failed on {world_size} CPU ranks (ranks' own output is in the captured stderr):\n"
                + "\n".join(problems)
            )
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        shutil.rmtree(out_dir, ignore_errors=True)
