"""The main job's launcher without its trainer: every switch checked up front (one case per rule), the Hydra
composition of the tiny MiMo example's config, and short runs' learning-rate schedule through verl's and
Megatron-Core's own scheduler construction.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from verl_mtp_example import launch
from verl_mtp_example.trainer_command import ALGOS, MODES, default_lr_warmup_steps, trainer_command
from verl_mtp_example.validation import UsageError, validate


def _args(*argv):
    return launch.build_parser().parse_args(list(argv))


def _checkpoint(workdir, step, heads=1):
    """What verl's checkpoint manager leaves: the step directory with the HF export's config, and the tracker
    file naming the step."""
    hf = workdir / "checkpoints" / f"global_step_{step}" / "actor" / "model" / "huggingface"
    os.makedirs(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "mimo", "num_nextn_predict_layers": heads}))
    (workdir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(step))


# (argv, fragment of the message); {w} is the test's work dir. One case per rule of verl_mtp_example.validation.
REFUSED = {
    "steps-zero": (["--steps", "0"], "--steps (STEPS) must be >= 1"),
    "steps-negative": (["--steps", "-3"], "--steps (STEPS) must be >= 1"),
    "mtp-layers-zero": (["--mtp-layers", "0"], "--mtp-layers must be >= 1"),
    "batch-zero": (["--batch", "0"], "--batch must be >= 1"),
    "n-zero": (["--n", "0"], "--n must be >= 1"),
    "seed-negative": (["--seed", "-1"], "--seed (SEED) must be >= 0"),
    "sft-steps-negative": (["--sft-steps", "-1"], "--sft-steps must be >= 0"),
    "save-freq-zero": (["--save-freq", "0"], "--save-freq must be >= 1"),
    "lr-zero": (["--lr", "0"], "--lr must be > 0"),
    "temperature-zero": (["--temperature", "0"], "--temperature must be > 0"),
    "timeout-negative": (["--timeout", "-5"], "--timeout must be > 0"),
    "top-k-zero": (["--top-k", "0"], "--top-k must be -1 (no top-k) or >= 1"),
    "mtp-coef-negative": (["--mode", "rl", "--mtp-coef", "-0.1"], "--mtp-coef must be >= 0"),
    "mini-batch-above-batch": (["--batch", "8", "--mini-batch", "16"],
                               "--mini-batch 16 must be between 1 and --batch 8"),
    "batch-not-multiple": (["--batch", "9"], "--batch 9 must be a multiple of the mini-batch 2"),
    "micro-batch-not-dividing": (["--batch", "8", "--n", "4", "--micro-batch", "3"],
                                 "--micro-batch 3 must divide the 8 samples of a mini-batch"),
    "warmup-not-shorter-than-run": (["--steps", "3", "--lr-warmup-steps", "3"],
                                    "--lr-warmup-steps 3 must be between 0 and --steps (STEPS) - 1 = 2"),
    "answer-does-not-fit": (["--max-operand", "50", "--max-response-length", "2"],
                            "--max-response-length 2 cannot hold the answer to 50+50"),
    "mtp-coef-with-occ": (["--mode", "rl_occ", "--mtp-coef", "0.2"],
                          "--mtp-coef 0.2 has no effect with --mode (MODE) rl_occ"),
    "mtp-coef-with-frozen": (["--mode", "frozen", "--mtp-coef", "0.2"], "has no effect with --mode (MODE) frozen"),
    "carry-without-occ": (["--mode", "rl", "--carry-last-lambda"], "--carry-last-lambda only applies to OCC"),
    "workdir-is-a-file": (["--workdir", "{w}/afile"], "is a file, not a directory"),
    "resume-and-resume-from": (["--resume", "--resume-from", "{w}/x/global_step_1"], "exclude each other"),
    "resume-without-checkpoint": (["--workdir", "{w}/empty", "--resume"],
                                  "--resume: no checkpoint in --workdir (WORKDIR)"),
    "resume-from-missing": (["--resume-from", "{w}/nowhere/global_step_1"], "is not an existing .../global_step_N"),
    "resume-from-not-a-step-dir": (["--resume-from", "{w}"], "is not an existing .../global_step_N"),
    "resume-nothing-left": (["--resume", "--steps", "2"], "is at step 2 but --steps (STEPS) is 2"),
    "resume-other-mode": (["--resume", "--steps", "5", "--mode", "detach"], "used --mode (MODE) rl_occ, this launch"),
    "resume-from-other-heads": (["--mtp-layers", "2", "--steps", "5",
                                 "--resume-from", "{w}/run/checkpoints/global_step_2"],
                                "holds a model with 1 MTP heads, but --mtp-layers is 2: use --mtp-layers 1"),
    "override-syntax": (["--", "actor_rollout_ref.actor.optim.lr"], "is not a Hydra override"),
    "override-mode-key": (["--mode", "detach", "--", "actor_rollout_ref.model.mtp.mtp_loss_type=rl"],
                          "--mode (MODE) detach sets actor_rollout_ref.model.mtp.mtp_loss_type=detach"),
    "override-occ-off-in-rl-occ": (["--", "actor_rollout_ref.model.mtp.occ.enable=False"],
                                   "--mode (MODE) rl_occ sets actor_rollout_ref.model.mtp.occ.enable=True"),
    "override-algo-key": (["--algo", "dapo", "--", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"],
                          "--algo (ALGO) dapo sets actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"),
    "override-algo-group": (["--", "tiny_mimo_example/algo=gspo"], "choose it with --algo (ALGO) instead"),
    "override-launcher-key": (["--", "trainer.total_training_steps=5"], "use --steps instead"),
    "tp-zero": (["--tp", "0"], "--tp must be >= 1"),
    "dp-zero": (["--dp", "0"], "--dp must be >= 1"),
    "dp-not-dividing-mini-batch": (["--batch", "8", "--n", "1", "--dp", "4"],
                                   "--dp 4 must divide the 2 samples of a mini-batch (--mini-batch 2 x --n 1)"),
    "micro-batch-not-dividing-rank-share": (["--batch", "8", "--n", "4", "--dp", "2", "--micro-batch", "8"],
                                            "--micro-batch 8 must divide the 4 samples of a mini-batch per "
                                            "data-parallel rank (--dp 2)"),
    "tp-not-dividing-heads": (["--tp", "4"], "--tp 4 must divide the tiny model's 4 attention heads and 2 "
                                             "key/value heads (Megatron splits them over the tensor-parallel "
                                             "ranks): use --tp in [1, 2]"),
    "override-world-size": (["--dp", "2", "--", "trainer.n_gpus_per_node=4"], "use --tp / --dp instead"),
    "override-actor-tp": (["--", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"],
                          "use --tp instead"),
}


@pytest.mark.parametrize("argv,message", list(REFUSED.values()), ids=list(REFUSED))
def test_each_rule_refuses_with_the_switch_value_and_fix(tmp_path, argv, message):
    (tmp_path / "afile").write_text("")
    workdir = tmp_path / "run"
    _checkpoint(workdir, 2)
    (workdir / "summary.json").write_text(json.dumps({"mode": "rl_occ", "algo": "dapo", "mtp_layers": 1}))
    argv = [a.replace("{w}", str(tmp_path)) for a in argv]
    if "--workdir" not in argv:
        argv = ["--workdir", str(workdir), *argv]
    with pytest.raises(UsageError) as info:
        validate(_args(*argv))
    assert message in str(info.value)


def test_contradicting_override_names_a_mode_that_fits(tmp_path):
    with pytest.raises(UsageError, match=r"e\.g\. --mode rl \(MODE=rl\)"):
        validate(_args("--workdir", str(tmp_path), "--mode", "detach", "--",
                       "actor_rollout_ref.model.mtp.mtp_loss_type=rl"))


ACCEPTED = {
    "defaults": [],
    "one-step": ["--steps", "1"],
    "two-steps": ["--steps", "2"],
    "three-steps": ["--steps", "3"],
    "same-value-override": ["--mode", "rl", "--", "actor_rollout_ref.model.mtp.mtp_loss_type=rl"],
    "lr-override-wins": ["--", "actor_rollout_ref.actor.optim.lr=5e-4"],
    "mtp-coef-rl": ["--mode", "rl", "--mtp-coef", "0.2"],
    "carry-occ": ["--mode", "rl_occ", "--carry-last-lambda", "--mtp-layers", "2"],
    "resume-with-checkpoint": ["--resume", "--steps", "5"],
    "e2e-greedy": ["--steps", "2", "--batch", "8", "--n", "1", "--top-k", "1", "--lr-warmup-steps", "0"],
    "e2e-dp2": ["--dp", "2", "--steps", "2", "--batch", "8", "--n", "1", "--top-k", "1", "--lr-warmup-steps", "0"],
    "e2e-tp2": ["--tp", "2", "--steps", "2", "--batch", "8", "--n", "1", "--top-k", "1", "--lr-warmup-steps", "0"],
    "tp2-dp2": ["--tp", "2", "--dp", "2", "--batch", "16", "--n", "2"],
}


@pytest.mark.parametrize("argv", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_documented_combinations_pass_without_warnings(tmp_path, argv):
    _checkpoint(tmp_path, 2)
    assert validate(_args("--workdir", str(tmp_path), *argv)) == []


ONE_UPDATE = {
    "mini-batch-switch": ["--batch", "8", "--mini-batch", "8"],
    "mini-batch-override": ["--", "actor_rollout_ref.actor.ppo_mini_batch_size=32"],
    "batch-override": ["--batch", "32", "--", "data.train_batch_size=8"],
}


@pytest.mark.parametrize("argv", list(ONE_UPDATE.values()), ids=list(ONE_UPDATE))
def test_occ_with_one_update_per_step_warns(tmp_path, argv):
    (warning,) = validate(_args("--workdir", str(tmp_path), *argv))
    assert "one optimizer update per step" in warning and "--mini-batch" in warning
    # a second epoch gives OCC its signal; without OCC a single update is fine
    two_epochs = argv + (["actor_rollout_ref.actor.ppo_epochs=2"] if "--" in argv else
                         ["--", "actor_rollout_ref.actor.ppo_epochs=2"])
    assert validate(_args("--workdir", str(tmp_path), *two_epochs)) == []
    assert validate(_args("--workdir", str(tmp_path), "--mode", "rl", *argv)) == []


def test_refusal_comes_before_anything_is_touched(tmp_path, capsys):
    """A refused launch returns 2 at once: no previous run set aside, no preparation, no trainer."""
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert launch.main(["--workdir", str(tmp_path), "--steps", "0"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    assert "--steps (STEPS) must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the Hydra composition the trainer gets
# ---------------------------------------------------------------------------------------------------------
def _trainer_config(*argv):
    cmd = trainer_command(_args(*argv), "/models/tiny", "/data", "/work")
    assert cmd[1:3] == ["-m", "verl_mtp.trainer.main_ppo"]
    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        return compose(config_name="mtp_ppo_megatron_trainer", overrides=cmd[3:])


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_composes_into_a_valid_mtp_config(mode):
    from verl.utils.config import omega_conf_to_dataclass

    config = _trainer_config("--mode", mode, "--algo", ALGOS[list(MODES).index(mode) % 2])
    mtp = omega_conf_to_dataclass(config.actor_rollout_ref.model.mtp)  # the product's own checks run here
    expected = {"detach": ("detach", False), "ce": ("ce", False), "rl": ("rl", False), "rl_occ": ("rl", True),
                "frozen": (None, False)}[mode]
    assert (mtp.mtp_loss_type, mtp.occ.enable) == expected
    assert mtp.enable and mtp.enable_train == (mode != "frozen")
    megatron = config.actor_rollout_ref.actor.megatron  # verl_cpu's cpu_engine group at the actor's engine
    assert megatron.override_transformer_config.attention_backend == "local" and megatron.vanilla_mbridge
    assert config.trainer.device == "cpu" and config.actor_rollout_ref.rollout.name == "hf_cpu"
    assert config.actor_rollout_ref.model.external_lib == "verl_mtp_example.register_mimo"


def test_switches_and_user_overrides_land_in_the_config():
    config = _trainer_config("--algo", "gspo", "--batch", "16", "--n", "4", "--steps", "7", "--seed", "5", "--",
                             "actor_rollout_ref.actor.optim.lr=5e-4")
    actor = config.actor_rollout_ref.actor
    assert (actor.policy_loss.loss_mode, actor.loss_agg_mode, actor.clip_ratio_high) == ("gspo", "seq-mean-token-mean",
                                                                                        0.0004)
    assert (config.data.train_batch_size, actor.ppo_mini_batch_size, actor.ppo_micro_batch_size_per_gpu) == (16, 4, 16)
    assert (config.trainer.total_training_steps, config.trainer.save_freq, config.data.seed) == (7, 7, 5)
    assert actor.optim.lr == 5e-4  # the user's override after -- wins over --lr
    assert config.reward.custom_reward_function.path == "pkg://verl_mtp_example.arithmetic_task"


@pytest.mark.parametrize("mode,scope", [("rl_occ", "data_parallel"), ("rl", "micro_batch")])
def test_tp_and_dp_set_the_world_the_actor_layout_and_per_rank_batches(mode, scope):
    config = _trainer_config("--mode", mode, "--tp", "2", "--dp", "2", "--batch", "16", "--n", "2")
    actor = config.actor_rollout_ref.actor
    assert (config.trainer.n_gpus_per_node, config.ray_kwargs.ray_init.num_gpus) == (4, 4)
    assert actor.megatron.tensor_model_parallel_size == 2
    # a mini-batch of 4 prompts x 2 samples, split over 2 data-parallel ranks
    assert (actor.ppo_mini_batch_size, actor.ppo_micro_batch_size_per_gpu) == (4, 4)
    assert config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu == 16
    assert config.actor_rollout_ref.model.mtp.occ.scope == scope  # OCC over the data-parallel group


def test_occ_scope_override_wins_over_the_dp_default():
    config = _trainer_config("--dp", "2", "--", "actor_rollout_ref.model.mtp.occ.scope=micro_batch")
    assert config.actor_rollout_ref.model.mtp.occ.scope == "micro_batch"
    assert _trainer_config().actor_rollout_ref.model.mtp.occ.scope == "micro_batch"  # one rank: verl-mtp's default


# ---------------------------------------------------------------------------------------------------------
# short runs: the learning-rate schedule Megatron-Core builds
# ---------------------------------------------------------------------------------------------------------
def _scheduler(optim_config):
    from verl.utils.megatron.optimizer import get_megatron_optimizer_param_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=optim_config.lr)
    return get_megatron_optimizer_param_scheduler(optimizer, optim_config)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
def test_short_runs_get_a_schedule_megatron_accepts(steps):
    config = _trainer_config("--steps", str(steps))
    optim = config.actor_rollout_ref.actor.optim
    optim.total_training_steps = config.trainer.total_training_steps  # what verl's RayPPOTrainer injects
    assert optim.lr_warmup_steps == default_lr_warmup_steps(steps) == min(3, steps - 1)
    scheduler = _scheduler(optim)
    start = scheduler.get_lr({})
    assert start == pytest.approx(optim.lr * 0.1 if steps > 1 else optim.lr)
    optim.lr_warmup_steps = steps  # the launcher's former fixed warm-up on a run this short
    with pytest.raises(AssertionError):
        _scheduler(optim)
