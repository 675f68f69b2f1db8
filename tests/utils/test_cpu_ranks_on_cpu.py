"""``run_cpu_ranks``: the ranks are pooled processes, reused by the next run with the caller's environment; a
failing rank's traceback comes back, and a rank left busy (stuck after another failed) retires the pool."""

from __future__ import annotations

import os
import time

import pytest

from verl_cpu.testing import run_cpu_ranks


def _whoami(info, value):
    return {"pid": os.getpid(), "rank": info.rank, "value": value, "mark": os.environ.get("VERL_CPU_TEST_MARK")}


def _fail_on_rank_1(info, then_rank_0_hangs):
    if info.rank == 1:
        raise ValueError("rank 1 refuses")
    if then_rank_0_hangs:
        time.sleep(600)  # as a rank waiting in a collective for the rank that failed
    return info.rank


def test_ranks_are_reused_with_the_callers_environment_and_replaced_when_left_busy(monkeypatch):
    first = run_cpu_ranks(_whoami, 2, "a")
    monkeypatch.setenv("VERL_CPU_TEST_MARK", "set after the ranks started")
    second = run_cpu_ranks(_whoami, 2, "b")
    assert [r["rank"] for r in first] == [0, 1] and [r["value"] for r in second] == ["b", "b"]
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the same two processes
    assert [r["mark"] for r in second] == ["set after the ranks started"] * 2
    with pytest.raises(RuntimeError, match=r"rank 1 raised:(.|\n)*ValueError: rank 1 refuses"):
        run_cpu_ranks(_fail_on_rank_1, 2, False)
    assert [r["pid"] for r in run_cpu_ranks(_whoami, 2, "c")] == [r["pid"] for r in first]  # both finished
    with pytest.raises(RuntimeError, match=r"rank 0 killed after another rank failed"):
        run_cpu_ranks(_fail_on_rank_1, 2, True, grace_s=1.0)
    fresh = run_cpu_ranks(_whoami, 2, "d")
    assert {r["pid"] for r in fresh}.isdisjoint(r["pid"] for r in first)  # a new pool
