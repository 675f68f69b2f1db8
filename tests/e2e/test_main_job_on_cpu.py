"""End-to-end: the main job (``python -m verl_mtp_example.launch``) through verl's real Ray PPO trainer on
CPU, checked on what it leaves behind: verl's metrics file, the checkpoints (HF export through the bridge, OCC
state) and the initial safetensors.

Runs (most of each is Ray and worker start-up; one prepared model/data/SFT directory is shared by all):

* ``detach`` and ``frozen`` (MTP enabled, not trained), 2 steps each, greedy rollouts with one sample per
  prompt and no gradient clipping: the trunks must come out bit-identical (see ``test_detach_...``);
* ``rl_occ`` with DAPO, 2 steps, checkpoints at steps 1 and 2 (same deterministic rollouts), then a resume
  from step 1 that must reproduce step 2 exactly;
* ``rl_occ`` with GSPO on a model with K = 2 MTP heads, a run of a single step with the launcher's default
  learning-rate warm-up (which a one-step run must shorten to nothing).
"""

from __future__ import annotations

import json

import pytest
from support.main_job import SAME_ROLLOUTS, changed, checkpoint_hf, finite, initial_hf, is_mtp, run_launcher

pytestmark = pytest.mark.slow  # verl's trainer end to end: the slow tier (README, "Tested versions")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


# SAME_ROLLOUTS: greedy rollouts, one sample per prompt (support.main_job). clip_grad is lifted because
# Megatron's global-norm clipping includes the MTP parameters' gradients: with detach's MTP CE gradients
# in the norm the clip factor differs and so does the (otherwise identical) trunk update.
_NO_CLIP = ["actor_rollout_ref.actor.optim.clip_grad=1e6"]


@pytest.fixture(scope="module")
def detach_run(prep_dir, runs_dir):
    workdir = runs_dir / "detach"
    return workdir, run_launcher(workdir, prep_dir, "--mode", "detach", *SAME_ROLLOUTS, overrides=_NO_CLIP)


@pytest.fixture(scope="module")
def frozen_run(prep_dir, runs_dir):
    workdir = runs_dir / "frozen"
    return workdir, run_launcher(workdir, prep_dir, "--mode", "frozen", *SAME_ROLLOUTS, overrides=_NO_CLIP)


# rl_occ, DAPO, deterministic rollouts (as above) so that a resumed run can be compared bit for bit with
# the uninterrupted one. occ.uninformative_drl=0.01 marks the first mini-batch of a step (no update yet:
# log pi - log pi_old is only bf16 recompute noise) as signal-free, so with carry_last_lambda its lambda
# comes from the OCC state, which a resume must therefore restore too.
_OCC = ["--mode", "rl_occ", "--algo", "dapo", "--carry-last-lambda", *SAME_ROLLOUTS]
_OCC_OVERRIDES = ["actor_rollout_ref.model.mtp.occ.uninformative_drl=0.01"]


@pytest.fixture(scope="module")
def occ_run(prep_dir, runs_dir):
    workdir = runs_dir / "rl_occ"
    return workdir, run_launcher(workdir, prep_dir, *_OCC, "--save-freq", "1", overrides=_OCC_OVERRIDES)


def test_detach_two_steps_trains_the_mtp_head(detach_run):
    workdir, metrics = detach_run
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        finite(metrics[step], "actor/pg_loss")
        finite(metrics[step], "critic/score/mean")
        assert finite(metrics[step], "actor/mtp_losses/mtp_1_loss") > 0
    initial, trained = initial_hf(workdir), checkpoint_hf(workdir, 2)
    assert set(initial) == set(trained)
    mtp = [n for n in initial if is_mtp(n)]
    assert mtp and changed(initial, trained, mtp), "detach: MTP weights identical to the initial ones"
    assert (workdir / "curves.png").stat().st_size > 10_000


def test_detach_leaves_the_trunk_exactly_as_mtp_off(detach_run, frozen_run):
    """The design guarantee of ``detach``: the MTP CE loss reaches the MTP layers only (inputs detached,
    shared output layer run with detached weights), so the trunk gets exactly the gradient it gets when the
    MTP layers are loaded but not trained -- bit for bit, given the same rollouts and no global clipping."""
    (d_dir, d_metrics), (f_dir, f_metrics) = detach_run, frozen_run
    for step in (1, 2):  # same rollouts, same policy loss
        assert d_metrics[step]["critic/score/mean"] == f_metrics[step]["critic/score/mean"]
        assert d_metrics[step]["actor/pg_loss"] == f_metrics[step]["actor/pg_loss"]
    initial, detach, frozen = initial_hf(d_dir), checkpoint_hf(d_dir, 2), checkpoint_hf(f_dir, 2)
    trunk = [n for n in initial if not is_mtp(n)]
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(initial, frozen, trunk), "the RL update did not change the trunk at all"
    assert not changed(detach, frozen, trunk), "detach changed the trunk differently from MTP-off"
    assert not changed(initial, frozen, mtp), "frozen MTP layers changed"
    assert changed(initial, detach, mtp)


def test_rl_occ_dapo_two_steps_calibrates_and_trains_the_head(occ_run):
    workdir, metrics = occ_run
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        finite(metrics[step], "actor/pg_loss")
        finite(metrics[step], "actor/mtp_pg_loss")
        finite(metrics[step], "actor/mtp_1/lambda")
        assert 0.0 <= finite(metrics[step], "actor/mtp_1/top1_agreement") <= 1.0
        assert finite(metrics[step], "actor/mtp_1/occ_dmtp_sq_sum") > 0
        # 4 mini-batches per step: the first is signal-free (carried lambda), the other 3 calibrate
        assert 0.0 < metrics[step]["actor/mtp_1/lambda_informative"] < 1.0
    assert any(abs(metrics[s]["actor/mtp_1/lambda"]) > 0 for s in (1, 2))
    initial, trained = initial_hf(workdir), checkpoint_hf(workdir, 2)
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(initial, trained, mtp), "rl_occ: MTP weights identical to the initial ones"
    for step in (1, 2):
        actor = workdir / "checkpoints" / f"global_step_{step}" / "actor"
        assert (actor / "model" / "dist_ckpt").is_dir()
        with open(actor / "mtp_occ_state_rank0.json") as f:
            assert "1" in json.load(f)["last_lambda"]  # carry_last_lambda=True keeps head 1's lambda


def test_resume_from_step_1_continues_exactly(occ_run, prep_dir, runs_dir):
    """Resume from the step-1 checkpoint of ``occ_run`` and train step 2 again: the resumed run must number
    it 2 and end bit-identical to the uninterrupted run -- which needs step 1's trained weights (MTP layers
    included, not the initial ones), the fp32 master weights and Adam moments, the LR schedule, the data
    loader position and OCC's carried lambda all restored."""
    src_dir, src_metrics = occ_run
    workdir = runs_dir / "resumed"
    metrics = run_launcher(workdir, prep_dir, *_OCC, "--resume-from",
                           str(src_dir / "checkpoints" / "global_step_1"), overrides=_OCC_OVERRIDES)
    assert sorted(metrics) == [2], "the resumed run must continue at global step 2"
    assert metrics[2]["training/global_step"] == 2
    for key in ("critic/score/mean", "actor/pg_loss", "actor/mtp_pg_loss", "actor/mtp_1/lambda",
                "actor/mtp_1/lambda_informative"):
        assert metrics[2][key] == src_metrics[2][key], key

    initial, step1, uninterrupted = initial_hf(src_dir), checkpoint_hf(src_dir, 1), checkpoint_hf(src_dir, 2)
    resumed = checkpoint_hf(workdir, 2)
    mtp = [n for n in initial if is_mtp(n)]
    assert changed(initial, step1, mtp), "step 1 did not change the MTP weights"
    assert changed(step1, uninterrupted, mtp), "step 2 did not change the MTP weights"
    assert not changed(uninterrupted, resumed, list(initial)), "resumed step 2 differs from the uninterrupted one"


def test_gspo_rl_occ_with_two_mtp_heads_in_a_one_step_run(prep_dir, runs_dir):
    workdir = runs_dir / "gspo_k2"
    metrics = run_launcher(workdir, prep_dir, "--mode", "rl_occ", "--algo", "gspo", "--mtp-layers", "2",
                           "--steps", "1", "--batch", "8", "--n", "4")
    assert sorted(metrics) == [1]
    finite(metrics[1], "actor/pg_loss")
    finite(metrics[1], "actor/mtp_pg_loss")
    for head in (1, 2):
        finite(metrics[1], f"actor/mtp_{head}/lambda")
        finite(metrics[1], f"actor/mtp_{head}/top1_agreement")
    assert (workdir / "curves.png").stat().st_size > 10_000
    initial, trained = initial_hf(workdir), checkpoint_hf(workdir, 1)
    for j in (0, 1):
        head = [n for n in initial if f".mtp_layers.{j}." in n]
        assert head and changed(initial, trained, head), f"MTP layer {j} unchanged"
