"""End-to-end with 2 ranks: the main job (``python -m verl_mtp_example.launch``) through verl's real Ray PPO
trainer with 2 Megatron actor processes on gloo, data parallel (``--dp 2``) and tensor parallel (``--tp 2``),
checked on what the runs leave behind: metrics, per-rank OCC state, checkpoints (HF export through the bridge,
the actor's TP shards gathered) and what each ``hf_cpu`` rollout replica served after every weight sync
(``--dump-rollout-weights``).

Runs (one prepared model/data/SFT directory shared by all; greedy rollouts, one sample per prompt):

* ``--dp 2``, ``rl_occ`` + DAPO, 2 steps, checkpoints at steps 1 and 2: OCC sums over the data-parallel group
  (the launcher's default at ``dp > 1``), so both ranks carry the same lambda; then a resume from step 1 that
  must reproduce step 2 exactly;
* ``--tp 2``, ``rl_occ`` + DAPO, 1 step: the rollout gets the TP-gathered weights, MTP layers included.
"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file
from support.main_job import SAME_ROLLOUTS, changed, checkpoint_hf, finite, initial_hf, is_mtp, run_launcher

pytestmark = pytest.mark.slow  # verl's trainer end to end: the slow tier (README, "Tested versions")

# occ.uninformative_drl=0.01 marks the first mini-batch of a step (no update yet) as signal-free, so with
# carry_last_lambda its lambda comes from the OCC state, which a resume must restore on every rank.
_OCC = ["--mode", "rl_occ", "--algo", "dapo", "--carry-last-lambda", "--dump-rollout-weights", *SAME_ROLLOUTS]
_OCC_OVERRIDES = ["actor_rollout_ref.model.mtp.occ.uninformative_drl=0.01"]
RANKS = (0, 1)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def dp2_run(prep_dir, runs_dir):
    workdir = runs_dir / "dp2"
    return workdir, run_launcher(workdir, prep_dir, *_OCC, "--dp", "2", "--save-freq", "1", overrides=_OCC_OVERRIDES)


@pytest.fixture(scope="module")
def tp2_run(prep_dir, runs_dir):
    workdir = runs_dir / "tp2"
    return workdir, run_launcher(workdir, prep_dir, *_OCC, "--steps", "1", "--tp", "2", overrides=_OCC_OVERRIDES)


def _served(workdir, replica, step):
    return load_file(os.path.join(workdir, "rollout_weights", f"replica{replica}_step{step}.safetensors"))


def _occ_state(workdir, step, rank):
    with open(workdir / "checkpoints" / f"global_step_{step}" / "actor" / f"mtp_occ_state_rank{rank}.json") as f:
        return json.load(f)["last_lambda"]


def _assert_served_equals(served, expected, what):
    """The replica serves exactly ``expected``: the same names (MTP layers included) and equal values (the
    checkpoint's bf16 export and the rollout's fp32 copy compared in fp32, where bf16 is exact)."""
    assert set(served) == set(expected), f"{what}: names differ: {set(served) ^ set(expected)}"
    assert any(is_mtp(n) for n in served), f"{what}: no MTP layers served"
    differ = [n for n in expected if not served[n].float().equal(expected[n].float())]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_dp2_rl_occ_uses_one_lambda_across_the_data_parallel_group(dp2_run):
    workdir, metrics = dp2_run
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        finite(metrics[step], "actor/pg_loss")
        finite(metrics[step], "actor/mtp_pg_loss")
        assert 0.0 < metrics[step]["actor/mtp_1/lambda_informative"] < 1.0
        # each rank calibrated on its own half of the samples; occ.scope=data_parallel all-reduced the sums,
        # so both ranks end the step holding the same lambda (micro_batch scope leaves them different)
        lambdas = [_occ_state(workdir, step, rank)["1"] for rank in RANKS]
        assert lambdas[0] != 0.0 and lambdas[0] == lambdas[1], lambdas
    initial, trained = initial_hf(workdir), checkpoint_hf(workdir, 2)
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(initial, trained, mtp), "DP2 rl_occ: MTP weights identical to the initial ones"


def test_dp2_rollout_serves_the_trained_weights_after_each_sync(dp2_run):
    """Every replica, at every sync: the sync before step 1 serves the initial weights; the sync after step
    N serves the actor's weights of step N as its checkpoint exported them, MTP layers included."""
    workdir, _ = dp2_run
    initial = initial_hf(workdir)
    expected = {0: initial, 1: checkpoint_hf(workdir, 1), 2: checkpoint_hf(workdir, 2)}
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(expected[0], expected[1], mtp) and changed(expected[1], expected[2], mtp)
    for replica in RANKS:
        for step, weights in expected.items():
            _assert_served_equals(_served(workdir, replica, step), weights, f"replica {replica}, sync of step {step}")


def test_dp2_resume_from_step_1_continues_exactly(dp2_run, prep_dir, runs_dir):
    """Resume the DP2 run from its step-1 checkpoint: step 2 must come out bit-identical to the uninterrupted
    run -- each rank's model, optimizer and OCC state restored -- and its rollout must start from step 1's
    weights."""
    src_dir, src_metrics = dp2_run
    workdir = runs_dir / "dp2_resumed"
    metrics = run_launcher(workdir, prep_dir, *_OCC, "--dp", "2", "--resume-from",
                           str(src_dir / "checkpoints" / "global_step_1"), overrides=_OCC_OVERRIDES)
    assert sorted(metrics) == [2], "the resumed run must continue at global step 2"
    for key in ("critic/score/mean", "actor/pg_loss", "actor/mtp_pg_loss", "actor/mtp_1/lambda",
                "actor/mtp_1/lambda_informative"):
        assert metrics[2][key] == src_metrics[2][key], key
    uninterrupted, resumed = checkpoint_hf(src_dir, 2), checkpoint_hf(workdir, 2)
    assert not changed(uninterrupted, resumed, list(uninterrupted)), "resumed step 2 differs"
    for rank in RANKS:
        assert _occ_state(workdir, 2, rank) == _occ_state(src_dir, 2, rank)
    _assert_served_equals(_served(workdir, 0, 1), checkpoint_hf(src_dir, 1), "resumed run's first sync")


def test_tp2_rollout_gets_the_gathered_trained_weights(tp2_run):
    workdir, metrics = tp2_run
    assert sorted(metrics) == [1]
    finite(metrics[1], "actor/pg_loss")
    finite(metrics[1], "actor/mtp_1/lambda")
    initial, trained = initial_hf(workdir), checkpoint_hf(workdir, 1)
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(initial, trained, mtp), "TP2 rl_occ: MTP weights identical to the initial ones"
    for replica in RANKS:
        _assert_served_equals(_served(workdir, replica, 0), initial, f"replica {replica}, first sync")
        _assert_served_equals(_served(workdir, replica, 1), trained, f"replica {replica}, sync after step 1")
