"""``python -m verl_mtp.trainer.main_ppo --check`` refuses what a run would fail on, before any GPU is allocated.

Each case composes the trainer config in-process (what the entry point composes), on the tiny MiMo model (one MTP
layer) and data prepared by ``prepare_math``, then runs :func:`verl_mtp.trainer.config_check.main`: a sound
cluster config passes with its layout printed; each bad combination exits 2 naming the key and the fix, the way
the run would have failed after the cluster started (config dataclasses, Megatron's groups, the engine's
refusals, vLLM's context limit, the reward loop). The recipes themselves: ``test_recipes_on_cpu.py``.
"""

from __future__ import annotations

import pandas as pd
import pytest

from verl_mtp.trainer import config_check
from verl_mtp.trainer.parallel_layout import ParallelLayout
from verl_mtp.workers.config.mtp_run_checks import occ_single_update_warning

MTP = "actor_rollout_ref.model.mtp"
ACTOR = "actor_rollout_ref.actor"
MEGATRON = "actor_rollout_ref.actor.megatron"
ROLLOUT = "actor_rollout_ref.rollout"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from verl_mtp_example.tiny_model import make_tiny_mimo

    root = tmp_path_factory.mktemp("models")
    return {k: make_tiny_mimo(str(root / f"mimo_k{k}"), num_mtp_layers=k) for k in (0, 1)}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from verl_mtp.utils.dataset.prepare_math import dapo_prompt, prepare

    root = tmp_path_factory.mktemp("data")
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)]
    pd.DataFrame(rows).to_parquet(root / "raw.parquet")
    assert dapo_prompt("x")  # the prepared prompts carry DAPO's instruction
    out = str(root / "train.parquet")
    prepare("dapo-math-17k", out, str(root / "raw.parquet"))
    return out


def _base(model: str, data: str) -> list[str]:
    """A sound 2-node x 8-GPU run: TP2 actor (DP 8), TP2 vLLM replicas, rl + OCC, 4 updates per step."""
    return [
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.trust_remote_code=True",
        f"data.train_files={data}",
        f"data.val_files={data}",
        "data.train_batch_size=16",
        "data.max_prompt_length=128",
        "data.max_response_length=256",
        "algorithm.adv_estimator=grpo",
        "critic.enable=False",
        f"{ACTOR}.ppo_mini_batch_size=4",
        f"{ACTOR}.use_dynamic_bsz=True",
        f"{ACTOR}.ppo_max_token_len_per_gpu=1024",
        f"{MEGATRON}.tensor_model_parallel_size=2",
        f"{ROLLOUT}.name=vllm",
        f"{ROLLOUT}.n=4",
        f"{ROLLOUT}.tensor_model_parallel_size=2",
        f"{ROLLOUT}.log_prob_use_dynamic_bsz=True",
        f"{ROLLOUT}.log_prob_max_token_len_per_gpu=1024",
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=8",
        f"{MTP}.enable=True",
        f"{MTP}.enable_train=True",
        f"{MTP}.mtp_loss_type=rl",
        f"{MTP}.occ.enable=True",
    ]


@pytest.fixture(scope="module")
def base(model_dirs, data_file):
    return _base(model_dirs[1], data_file)


def _check(overrides, capsys) -> tuple[int, str, str]:
    rc = config_check.main(list(overrides))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_sound_config_passes_and_prints_the_layout(base, capsys):
    rc, out, err = _check(base, capsys)
    assert rc == 0, err
    assert "cluster: 2 node(s) x 8 GPUs = 16 GPUs" in out
    assert "actor:   DP 8 x TP 2 x PP 1 x CP 1" in out
    assert "rollout: 8 replica(s) x TP 2" in out
    assert "model:   1 MTP layer(s) loaded (MiMoForCausalLM)" in out
    assert "4 optimizer update(s) per step of 16 sequences" in out
    assert "1 node(s) -> DP 4, 2 node(s) -> DP 8" in out
    for built in ("McoreActorConfig", "RolloutConfig", "CheckpointEngineConfig", "MtpRLConfig", "HFModelConfig"):
        assert built in out
    assert "WARNING" not in out and "not checked here" not in out


# (overrides on top of the sound config, what the refusal must name, the fix it must give)
BAD = {
    "unknown-occ-scope": ([f"{MTP}.occ.scope=bogus"], "occ.scope='bogus' is unknown", "data_parallel"),
    "unknown-regime": ([f"{MTP}.mtp_loss_type=policy"], "mtp_loss_type='policy' is unknown", "'rl'"),
    "occ-without-rl": ([f"{MTP}.mtp_loss_type=detach"], "occ.enable=True with mtp_loss_type=detach",
                       "set mtp_loss_type=rl or occ.enable=False"),
    "regime-without-mtp": ([f"{MTP}.enable=False", f"{MTP}.occ.enable=False"], "mtp_loss_type=rl needs",
                           "mtp.enable=True"),
    "diagnostics-with-distributed-optimizer": ([f"{MTP}.occ.diagnose_every=5"], "occ.diagnose_every=5",
                                               "use_distributed_optimizer=False"),
    "gradient-estimator-with-distributed-optimizer": ([f"{MTP}.occ.estimator=gradient"], "occ.estimator=gradient",
                                                      "use_distributed_optimizer=False"),
    "dynamic-cp-with-rl": ([f"{MEGATRON}.dynamic_context_parallel=True", f"{MEGATRON}.max_seqlen_per_dp_cp_rank=512"],
                           "dynamic_context_parallel=True",
                           "dynamic_context_parallel=False"),
    "world-not-divisible": ([f"{MEGATRON}.pipeline_model_parallel_size=3"], "model-parallel group",
                            "change the node count"),
    "expert-group-not-divisible": ([f"{MEGATRON}.expert_model_parallel_size=32"], "expert group",
                                   "lower expert_model_parallel_size"),
    "rollout-replica-not-divisible": ([f"{ROLLOUT}.tensor_model_parallel_size=3"], "one rollout replica",
                                      f"{ROLLOUT}.tensor_model_parallel_size"),
    "draft-without-mtp-layers-loaded": ([f"{MTP}.enable=False", f"{MTP}.mtp_loss_type=null", f"{MTP}.occ.enable=False",
                                         f"{MTP}.enable_rollout=True"], "enable_rollout=True", "set enable=True"),
    "no-draft-tokens": ([f"{MTP}.enable_rollout=True", f"{MTP}.num_speculative_tokens=0"],
                        "num_speculative_tokens must be >= 1", ">= 1"),
    "draft-on-hf-rollout": ([f"{MTP}.enable_rollout=True", f"{ROLLOUT}.name=hf"], "'hf' rollout does not draft",
                            "('vllm', 'sglang')"),
    "unknown-reward-manager": (["reward.reward_manager.name=dapoo"], "reward.reward_manager.name=dapoo",
                               "choose one of"),
    "context-beyond-the-model": (["data.max_response_length=1024"], "exceeds the 512 positions",
                                 "shorten the lengths"),
    "no-bridge": ([f"{MEGATRON}.use_mbridge=False"], "use_mbridge=False", "set use_mbridge=True"),
    "unknown-key": ([f"{MTP}.occ.lambda_plsu=2"], "lambda_plsu", "not in struct"),
    "fused-main-head-without-chunks": (
        ["actor_rollout_ref.model.use_fused_kernels=True", f"{MTP}.logprob_chunk_size=0"], "logprob_chunk_size",
        "use_fused_kernels=False",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_combination_is_refused_with_key_and_fix(base, capsys, case):
    overrides, key, fix = BAD[case]
    rc, out, err = _check(base + overrides, capsys)
    assert rc == 2, out
    assert out == ""
    refusal = err.partition("verl-mtp --check: REFUSED:")[2]
    assert key in refusal and fix in refusal, err


def test_plugin_policy_that_drops_the_engine_is_refused(base, capsys, monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "none")
    rc, _, err = _check(base, capsys)
    assert rc == 2 and "VERL_USE_EXTERNAL_PLUGINS=none" in err and "add verl_mtp to it" in err
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "other,verl_mtp")
    assert _check(base, capsys)[0] == 0


def test_model_without_mtp_layers_is_refused(model_dirs, data_file, capsys):
    rc, _, err = _check(_base(model_dirs[0], data_file), capsys)
    assert rc == 2
    assert "declares no MTP layer" in err and "set mtp.enable=False" in err


def test_data_without_reward_columns_is_refused(base, tmp_path, capsys):
    raw = tmp_path / "raw.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}]).to_parquet(raw)
    rc, _, err = _check(base + [f"data.val_files={raw}"], capsys)
    assert rc == 2
    assert "data.val_files" in err and "['data_source', 'reward_model']" in err
    assert config_check.PREPARE_COMMAND in err


def test_the_engines_refusals_are_found_only_where_the_engine_refuses(base, capsys):
    """At DP 1 the gradient estimator works with the distributed optimizer, and without it at any DP."""
    one_rank = ["trainer.nnodes=1", "trainer.n_gpus_per_node=2"]
    assert _check(base + [f"{MTP}.occ.diagnose_every=5", *one_rank], capsys)[0] == 0
    assert _check(base + [f"{MTP}.occ.diagnose_every=5", f"{MEGATRON}.use_distributed_optimizer=False"], capsys)[0] == 0


WARNED = {
    "one-update-per-step": ([f"{ACTOR}.ppo_mini_batch_size=16"], "lambda is 0 by construction",
                            f"{ACTOR}.ppo_mini_batch_size=4"),
    "speculative-decoding": ([f"{MTP}.enable_rollout=True", f"{MTP}.num_speculative_tokens=2"],
                             "spec_accept_rate", "> the model's 1 MTP layer(s)"),
    "no-hf-export": ([f"{MEGATRON}.use_dist_checkpointing=True"], "saves no Hugging Face weights", "add hf_model"),
}


@pytest.mark.parametrize("case", list(WARNED), ids=list(WARNED))
def test_legal_but_meaningless_settings_warn(base, capsys, case):
    overrides, first, second = WARNED[case]
    rc, out, err = _check(base + overrides, capsys)
    assert rc == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("WARNING: ")]
    assert any(first in w for w in warnings) and any(second in w for w in warnings), out


def test_stale_drafts_warning_names_the_fix(base, capsys):
    rc, out, _ = _check(base + [f"{MTP}.enable_rollout=True"], capsys)
    assert rc == 0 and "detached_head_ce_coef > 0" in out
    rc, out, _ = _check(base + [f"{MTP}.enable_rollout=True", f"{MTP}.detached_head_ce_coef=0.1"], capsys)
    assert rc == 0 and "detached_head_ce_coef > 0" not in out


def test_missing_model_and_data_are_reported_not_refused(data_file, capsys):
    rc, out, err = _check(_base("/nonexistent/MiMo-7B-RL", "/nonexistent/train.parquet"), capsys)
    assert rc == 0, err
    assert "not checked here: actor_rollout_ref.model.path=/nonexistent/MiMo-7B-RL" in out
    assert "not checked here: data.train_files: /nonexistent/train.parquet" in out


def test_one_update_rule_counts_updates():
    assert occ_single_update_warning(True, 128, 32, 1) is None
    assert occ_single_update_warning(False, 128, 128, 1) is None
    assert occ_single_update_warning(True, 128, 128, 2) is None  # the second epoch has the signal
    message = occ_single_update_warning(True, 128, 128, 1, mini_batch_setting=lambda m: f"--mini-batch {m}")
    assert "one optimizer update per step" in message and message.endswith("--mini-batch 32")


def test_layout_arithmetic():
    glm = ParallelLayout(nnodes=32, gpus_per_node=8, tp=4, pp=2, cp=1, ep=8, etp=1, rollout_tp=8)
    assert (glm.world_size, glm.dp, glm.expert_group_size, glm.rollout_replicas) == (256, 32, 16, 32)
    assert glm.problems() == []
    one_node = ParallelLayout(nnodes=1, gpus_per_node=8, tp=4, pp=2, cp=1, ep=8, etp=1, rollout_tp=8)
    (problem,) = one_node.problems()
    assert "expert group expert-tensor x expert x pipeline = 1 x 8 x 2 = 16" in problem
    assert "experts: EP 8 x ETP 1 (expert-data-parallel 16)" in glm.describe()


def test_entry_point_check_flag_runs_no_trainer(base, monkeypatch, capsys):
    """``--check`` anywhere among the arguments of ``python -m verl_mtp.trainer.main_ppo``."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["main_ppo", base[0], "--check", *base[1:], f"{MTP}.occ.scope=bogus"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("verl_mtp.trainer.main_ppo", run_name="__main__")
    assert exit_info.value.code == 2
    assert "occ.scope='bogus' is unknown" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()
