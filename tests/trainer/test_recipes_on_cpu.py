"""The recipe/mtp_rl launch scripts compose the configs they claim to, for every MTP_MODE, with no GPU.

Every script runs under bash with ``DRY_RUN=1`` for every ``MTP_MODE``. A real dry run (Hydra's
``--cfg job --resolve`` on ``python -m verl_mtp.trainer.main_ppo``) imports verl, torch and Megatron: 7-15 s of
CPU each, too much for 3 scripts x 4 modes in a unit test. So:

* every (script, mode) runs through bash with a ``python3`` stub on ``PATH`` that records the launch line; the
  recorded Hydra overrides are composed in-process (the same config module and overrides the entry point uses)
  and resolved, and go through the entry point's start-up checks in-process (``config_check.check_config``);
* one real ``DRY_RUN=1`` per script (``--check``, in parallel) checks the whole path: bash, the entry point, the
  printed layout, exit status 0; one real ``DRY_RUN=config`` checks the printed YAML is exactly the in-process
  composition, so what the stub-based tests check is what the scripts launch.

The configs are checked for the MTP regime, the algorithm (policy loss, clipping, batch sizes, lr, lengths, DAPO's
overlong buffer and dynamic sampling), the parallel layout, paths, the Hugging Face export in every checkpoint,
verl's own ``validate_config`` and verl-mtp's start-up checks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_mtp.workers.config.mtp import MTP_REGIME_REGISTRY

REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "recipe" / "mtp_rl"
MODES = (*MTP_REGIME_REGISTRY, "rl_occ")  # every regime of the product, and the recipes' OCC convenience
DRY_RUN_TIMEOUT_S = 300
ENTRY = ["-m", "verl_mtp.trainer.main_ppo", "--check"]
# One real DRY_RUN=1 (--check) per script, each in a different mode, and one real DRY_RUN=config (printed YAML).
REAL_RUNS = {"run_mimo_7b_rl_dapo.sh": "rl_occ", "run_mimo_7b_rl_gspo.sh": "rl", "run_glm45_air_dapo.sh": "detach"}
PRINT_RUN = ("run_glm45_air_dapo.sh", "detach")

# Everything the scripts read from the environment: cleared so the test sees the scripts' own defaults.
RECIPE_ENV = (
    "MTP_MODE MTP_COEF OCC_LAMBDA_PLUS OCC_SCOPE OCC_CARRY_LAST_LAMBDA OCC_INITIAL_LAMBDA SPEC_DECODE "
    "SPEC_NUM_TOKENS DRY_RUN PROJECT_NAME EXP_NAME NNODES GPUS_PER_NODE DATA_HOME MODEL_PATH TRUST_REMOTE_CODE "
    "TRAIN_FILE VAL_FILE CKPTS_DIR MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH OVERLONG_BUFFER_LEN OVERLONG_PENALTY_FACTOR "
    "TRAIN_PROMPT_BSZ N_RESP_PER_PROMPT TRAIN_PROMPT_MINI_BSZ LR CLIP_RATIO_LOW CLIP_RATIO_HIGH CLIP_RATIO_C "
    "POLICY_LOSS_MODE LOSS_AGG_MODE FILTER_GROUPS FILTER_GROUPS_METRIC FILTER_MAX_INFLIGHT TOTAL_STEPS TEMPERATURE "
    "VAL_TOP_P VAL_N TRAIN_TP TRAIN_PP TRAIN_CP TRAIN_EP TRAIN_ETP GEN_TP GEN_GPU_MEMORY_UTILIZATION OFFLOAD "
    "VANILLA_MBRIDGE LOGGER"
).split()

# What each script must compose to (besides the MTP block, checked per mode).
EXPECTED = {
    "run_mimo_7b_rl_dapo.sh": dict(
        model="MiMo-7B-RL",
        loss_mode="vanilla",
        loss_agg_mode="token-mean",
        clip=(0.2, 0.28, 10.0),
        filter_groups=True,
        nnodes=16,
        layout=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2),
    ),
    "run_mimo_7b_rl_gspo.sh": dict(
        model="MiMo-7B-RL",
        loss_mode="gspo",
        loss_agg_mode="seq-mean-token-mean",
        clip=(3e-4, 4e-4, 10.0),
        filter_groups=False,
        nnodes=16,
        layout=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2),
    ),
    "run_glm45_air_dapo.sh": dict(
        model="GLM-4.5-Air",
        loss_mode="vanilla",
        loss_agg_mode="token-mean",
        clip=(0.2, 0.28, 10.0),
        filter_groups=True,
        nnodes=32,
        layout=dict(
            tensor_model_parallel_size=4,
            pipeline_model_parallel_size=2,
            context_parallel_size=1,
            expert_model_parallel_size=8,
            expert_tensor_parallel_size=1,
        ),
    ),
}
SCRIPTS = tuple(EXPECTED)

# MTP_MODE -> (mtp_loss_type, detach_encoder as the engine runs it, occ.enable)
MODE_TABLE = {
    "detach": ("detach", True, False),
    "ce": ("ce", False, False),
    "rl": ("rl", False, False),
    "rl_occ": ("rl", False, True),
}

# One extra run of the DAPO script with every knob moved away from its default.
CUSTOM_ENV = {
    "MTP_MODE": "detach",
    "MTP_COEF": "0.2",
    "SPEC_DECODE": "1",
    "SPEC_NUM_TOKENS": "2",
    "TRAIN_CP": "1",  # away from the MiMo scripts' (the paper's) CP2
    "NNODES": "4",
    "GPUS_PER_NODE": "8",
    "MODEL_PATH": "/models/custom-mimo",
    "TRAIN_FILE": "/data/custom-train.parquet",
    "VAL_FILE": "/data/custom-val.parquet",
    "CKPTS_DIR": "/ckpts/custom",
}
CUSTOM_ARGS = ("trainer.total_training_steps=7", "actor_rollout_ref.actor.optim.lr=3e-6")


STUB = """#!/usr/bin/env bash
# Test stub for python3: record the arguments (NUL-separated) and print nothing.
printf '%s\\0' "$@" > "${VERL_MTP_TEST_ARGV:?}"
"""


def _env(home: Path, path_first: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_ENV}
    # The scripts call `python3`: make it this interpreter (the one with verl and verl_mtp installed),
    # or the recording stub.
    first = path_first if path_first is not None else Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(first), env.get("PATH", "")])
    env["HOME"] = str(home)
    env["DRY_RUN"] = "1"
    env.update(extra)
    return env


def _run(script: str, home: Path, args=(), path_first: Path | None = None, **extra: str):
    return subprocess.run(
        ["bash", str(RECIPE_DIR / script), *args],
        env=_env(home, path_first, **extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DRY_RUN_TIMEOUT_S,
    )


def _compose(overrides: list[str]):
    """What ``python -m verl_mtp.trainer.main_ppo --cfg job --resolve <overrides>`` prints, built in-process."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl_mtp.trainer.config", version_base=None):
        cfg = compose(config_name="mtp_ppo_megatron_trainer", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def launch_lines(home, tmp_path_factory):
    """Hydra overrides each script passes to the entry point: ``{(script, mode): [...]}`` plus ``"custom"``."""
    stub_dir = tmp_path_factory.mktemp("stub_bin")
    stub = stub_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    jobs = {(script, mode): (script, (), {"MTP_MODE": mode}) for script in SCRIPTS for mode in MODES}
    jobs["custom"] = ("run_mimo_7b_rl_dapo.sh", CUSTOM_ARGS, CUSTOM_ENV)
    lines = {}
    for i, (key, (script, args, env)) in enumerate(jobs.items()):
        argv_file = stub_dir / f"argv_{i}"
        proc = _run(script, home, args, path_first=stub_dir, VERL_MTP_TEST_ARGV=str(argv_file), **env)
        assert proc.returncode == 0, f"{key} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
        argv = argv_file.read_bytes().decode().split("\0")[:-1]
        assert argv[: len(ENTRY)] == ENTRY, argv[:8]
        lines[key] = argv[len(ENTRY) :]
    return lines


@pytest.fixture(scope="module")
def dry_runs(launch_lines):
    """Resolved configs ``{(script, mode): cfg}`` plus ``"custom"``, composed from the recorded launch lines."""
    return {key: _compose(overrides) for key, overrides in launch_lines.items()}


@pytest.fixture(scope="module", autouse=True)
def _real_dry_runs(request, home):
    """Start the real ``DRY_RUN=1`` runs (``REAL_RUNS``) at module start, so they overlap with the other tests.

    Only when a selected test reads them. Each run gets its own process group (bash and its python child),
    which is killed if the run is still going when the module ends.
    """
    if not any({"printed", "checked"} & set(getattr(item, "fixturenames", ())) for item in request.session.items):
        yield {}
        return
    runs = {(script, "1"): mode for script, mode in REAL_RUNS.items()}
    runs[(PRINT_RUN[0], "config")] = PRINT_RUN[1]
    procs = {
        (script, dry_run): subprocess.Popen(
            ["bash", str(RECIPE_DIR / script)],
            env=_env(home, MTP_MODE=mode, DRY_RUN=dry_run),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for (script, dry_run), mode in runs.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.fixture(scope="module")
def finished_runs(_real_dry_runs):
    """The real runs' output: ``{(script, DRY_RUN): CompletedProcess}``."""
    out = {}
    for key, proc in _real_dry_runs.items():
        try:
            stdout, stderr = proc.communicate(timeout=DRY_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        out[key] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def printed(finished_runs):
    """Real ``DRY_RUN=config`` output (the resolved YAML) of ``PRINT_RUN``."""
    return finished_runs[(PRINT_RUN[0], "config")]


@pytest.fixture(scope="module")
def checked(finished_runs):
    """Real ``DRY_RUN=1`` output of one mode per script: ``{script: CompletedProcess}``."""
    return {script: finished_runs[(script, "1")] for script in REAL_RUNS}


def _get(cfg, key):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


# ----------------------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_shape(script):
    text = (RECIPE_DIR / script).read_text()
    assert "set -xeuo pipefail" in text
    assert re.search(r'source "\$\{SCRIPT_DIR\}/common.sh"', text)
    # One launch, through common.sh's mtp_rl_launch (the trainer command is written there only), with the
    # script's own arguments.
    assert len(re.findall(r'^mtp_rl_launch "\$@"$', text, flags=re.M)) == 1
    assert "python3" not in text
    # The MTP_MODE -> overrides mapping lives in common.sh only.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "model.mtp." not in code and "mtp_loss_type" not in code
    assert os.access(RECIPE_DIR / script, os.X_OK)
    subprocess.run(["bash", "-n", str(RECIPE_DIR / script)], check=True)


def test_common_is_valid_bash_and_holds_the_one_trainer_command():
    subprocess.run(["bash", "-n", str(RECIPE_DIR / "common.sh")], check=True)
    text = (RECIPE_DIR / "common.sh").read_text()
    assert len(re.findall(r"python3 -m verl_mtp\.trainer\.main_ppo", text)) == 1


def test_the_modes_are_the_products_regimes_and_rl_occ():
    """The recipes keep no list of regimes: MTP_MODE passes a regime's name on, and only rl_occ has a case."""
    assert set(MODE_TABLE) == set(MODES)
    text = (RECIPE_DIR / "common.sh").read_text()
    block = text[text.index('case "${MTP_MODE}" in'):]
    block = block[: block.index("esac")]
    arms = [line.strip() for line in block.splitlines()[1:] if line.strip().endswith(")")]
    assert arms == ["rl_occ)", "*)"]


def test_unknown_mode_is_refused_by_the_product_with_the_regimes(launch_lines):
    """An MTP_MODE the product does not know reaches mtp_loss_type, and the MTP config refuses it naming every
    registered regime."""
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    overrides = [o.replace("mtp_loss_type=detach", "mtp_loss_type=policy") for o in launch_lines["custom"]]
    assert overrides != launch_lines["custom"]
    with pytest.raises(InstantiationException, match="mtp_loss_type='policy' is unknown") as refused:
        omega_conf_to_dataclass(_compose(overrides).actor_rollout_ref.model.mtp)
    assert all(name in str(refused.value) for name in MTP_REGIME_REGISTRY)


# ----------------------------------------------------------------------------------------- printed configs


def test_dry_run_config_prints_the_resolved_config(printed, dry_runs):
    proc = printed
    assert proc.returncode == 0, f"DRY_RUN=config {PRINT_RUN} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    # stdout is the YAML and nothing else: bash's trace and every log line go to stderr.
    cfg = OmegaConf.create(proc.stdout)
    assert "${" not in proc.stdout  # resolved
    assert "hydra" not in cfg  # the job config only
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(dry_runs[PRINT_RUN])


# what --check prints for each script's default cluster
CHECKED_LAYOUT = {
    "run_mimo_7b_rl_dapo.sh": ["cluster: 16 node(s) x 8 GPUs = 128 GPUs", "actor:   DP 16 x TP 2 x PP 2 x CP 2",
                               "rollout: 64 replica(s) x TP 2"],
    "run_mimo_7b_rl_gspo.sh": ["actor:   DP 16 x TP 2 x PP 2 x CP 2", "rollout: 64 replica(s) x TP 2"],
    "run_glm45_air_dapo.sh": ["cluster: 32 node(s) x 8 GPUs = 256 GPUs", "actor:   DP 32 x TP 4 x PP 2 x CP 1",
                              "experts: EP 8 x ETP 1 (expert-data-parallel 16)", "rollout: 32 replica(s) x TP 8",
                              "1 node(s) -> does not divide, 2 node(s) -> DP 2"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_checks_the_run(checked, script):
    proc = checked[script]
    assert proc.returncode == 0, f"DRY_RUN=1 {script} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    assert proc.stdout.startswith("verl-mtp --check: OK (no GPU, no Ray)\n")
    for line in CHECKED_LAYOUT[script]:
        assert line in proc.stdout, proc.stdout
    assert "WARNING" not in proc.stdout
    # The default paths do not exist on the test machine: reported, not refused.
    assert "not checked here: actor_rollout_ref.model.path=" in proc.stdout


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_and_mode_passes_the_start_up_checks(dry_runs, script, mode):
    from verl_mtp.trainer.config_check import check_config

    report = check_config(dry_runs[(script, mode)])
    assert report.warnings == [], report.warnings
    assert any("MtpRLConfig" in built for built in report.built)


def test_speculative_decoding_run_passes_with_its_cost_warned(dry_runs):
    from verl_mtp.trainer.config_check import check_config

    (warning,) = check_config(dry_runs["custom"]).warnings  # detach keeps the drafts trained: no stale warning
    assert "spec_accept_rate" in warning


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_dry_run_value_fails_before_python(script, home):
    proc = _run(script, home, DRY_RUN="yes")
    assert proc.returncode == 2 and "DRY_RUN=yes is not 0, 1 or config" in proc.stderr
    assert "verl_mtp.trainer.main_ppo" not in proc.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_mtp_mode(dry_runs, script, mode):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = dry_runs[(script, mode)]
    mtp = cfg.actor_rollout_ref.model.mtp
    loss_type, detach_encoder, occ_enable = MODE_TABLE[mode]
    assert mtp.enable is True and mtp.enable_train is True
    assert mtp.mtp_loss_type == loss_type
    assert mtp.detach_encoder is detach_encoder and omega_conf_to_dataclass(mtp).mtp_loss_type == loss_type
    assert mtp.occ.enable is occ_enable
    assert mtp.occ.lambda_plus == pytest.approx(1.0)
    assert mtp.mtp_loss_scaling_factor == pytest.approx(0.1)  # MTP_COEF default
    assert mtp.train_lm_head is False
    assert mtp.enable_rollout is False  # speculative decoding is opt-in
    # The rollout reads the same block (resolved interpolation).
    assert OmegaConf.to_container(cfg.actor_rollout_ref.rollout.mtp) == OmegaConf.to_container(mtp)
    assert mode.replace("_", "-") in cfg.trainer.experiment_name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_mtp_block_builds_the_dataclass(dry_runs, script, mode):
    from verl.utils.config import omega_conf_to_dataclass
    from verl_mtp.workers.config import MtpRLConfig

    mtp = omega_conf_to_dataclass(dry_runs[(script, mode)].actor_rollout_ref.model.mtp)
    assert type(mtp) is MtpRLConfig
    assert mtp.is_rl is (MODE_TABLE[mode][0] == "rl")


@pytest.mark.parametrize("script", SCRIPTS)
def test_modes_differ_only_in_the_mtp_block(dry_runs, script):
    def strip(cfg):
        c = OmegaConf.to_container(cfg)
        del c["actor_rollout_ref"]["model"]["mtp"], c["actor_rollout_ref"]["rollout"]["mtp"]
        del c["trainer"]["experiment_name"], c["trainer"]["default_local_dir"]
        del c["actor_rollout_ref"]["rollout"]["trace"]["experiment_name"]  # interpolates the trainer's
        return c

    base = strip(dry_runs[(script, MODES[0])])
    for mode in MODES[1:]:
        assert strip(dry_runs[(script, mode)]) == base, mode


@pytest.mark.parametrize("script", SCRIPTS)
def test_algorithm_settings(dry_runs, script):
    want = EXPECTED[script]
    cfg = dry_runs[(script, "rl_occ")]
    actor = cfg.actor_rollout_ref.actor
    low, high, c = want["clip"]
    assert actor.strategy == "megatron"
    assert actor.policy_loss.loss_mode == want["loss_mode"]
    assert actor.loss_agg_mode == want["loss_agg_mode"]
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == pytest.approx((low, high, c))
    assert actor.optim.lr == pytest.approx(1e-6)
    assert actor.ppo_mini_batch_size == 32
    assert actor.entropy_coeff == 0 and actor.use_kl_loss is False
    assert cfg.data.train_batch_size == 128
    assert cfg.actor_rollout_ref.rollout.n == 16
    assert cfg.data.max_prompt_length == 2048
    assert cfg.data.max_response_length == 8192
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.use_kl_in_reward is False
    assert cfg.critic.enable is False
    # DAPO reward: overlong buffer of 4k inside the 8k budget.
    assert cfg.reward.reward_manager.name == "dapo"
    overlong = cfg.reward.reward_kwargs.overlong_buffer_cfg
    assert overlong.enable is True and overlong.len == 4096 and overlong.penalty_factor == pytest.approx(1.0)
    assert cfg.reward.reward_kwargs.max_resp_len == 8192
    # Dynamic sampling the way verl 0.9.1's trainer does it.
    assert cfg.algorithm.filter_groups.enable is want["filter_groups"]
    assert cfg.algorithm.filter_groups.metric == "acc"
    assert cfg.trainer.total_training_steps == 200
    val = cfg.actor_rollout_ref.rollout.val_kwargs
    assert val.n == 32 and val.do_sample is True


@pytest.mark.parametrize("script", ["run_mimo_7b_rl_dapo.sh", "run_mimo_7b_rl_gspo.sh"])
@pytest.mark.parametrize("mode", list(MODE_TABLE))
def test_mimo_runs_the_papers_layout_in_every_regime(dry_runs, script, mode):
    """TP2 / PP2 / CP2, as the paper trained MiMo-7B-RL, for detach, ce, rl and rl_occ alike."""
    cfg = dry_runs[(script, mode)]
    assert cfg.actor_rollout_ref.model.mtp.mtp_loss_type == MODE_TABLE[mode][0]
    for role in ("actor", "ref"):
        megatron = cfg.actor_rollout_ref[role].megatron
        got = (megatron.tensor_model_parallel_size, megatron.pipeline_model_parallel_size,
               megatron.context_parallel_size, megatron.dynamic_context_parallel)
        assert got == (2, 2, 2, False), (role, got)


@pytest.mark.parametrize("script", SCRIPTS)
def test_layout_and_paths(dry_runs, script, home):
    want = EXPECTED[script]
    cfg = dry_runs[(script, "rl")]
    for role in ("actor", "ref"):
        megatron = cfg.actor_rollout_ref[role].megatron
        for key, value in want["layout"].items():
            assert megatron[key] == value, (role, key)
    megatron = cfg.actor_rollout_ref.actor.megatron
    assert megatron.use_mbridge is True
    # every checkpoint holds the Hugging Face export (MTP layers included) that verl_mtp.model_merger serves
    assert list(cfg.actor_rollout_ref.actor.checkpoint.save_contents) == ["model", "optimizer", "extra", "hf_model"]
    assert cfg.actor_rollout_ref.model.use_fused_kernels is False  # verl turns them off with MTP anyway
    assert megatron.dynamic_context_parallel is False  # unsupported by the rl regime
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert cfg.trainer.nnodes == want["nnodes"] and cfg.trainer.n_gpus_per_node == 8
    # Default locations live under $HOME.
    for key in ("actor_rollout_ref.model.path", "data.train_files", "data.val_files", "trainer.default_local_dir"):
        assert str(_get(cfg, key)).startswith(str(home) + os.sep), key
    assert cfg.actor_rollout_ref.model.path.endswith(want["model"])
    assert "dapo-math-17k" in cfg.data.train_files and "aime-2024" in cfg.data.val_files


# The scripts select the legacy mbridge backend on purpose (the bridge this project installs).
@pytest.mark.filterwarnings("ignore:The legacy mbridge backend:FutureWarning")
@pytest.mark.parametrize("script", SCRIPTS)
def test_passes_verl_validate_config(dry_runs, script):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    for mode in ("detach", "rl_occ"):
        cfg = dry_runs[(script, mode)]
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_environment_and_extra_overrides_reach_the_config(dry_runs):
    cfg = dry_runs["custom"]
    mtp = cfg.actor_rollout_ref.model.mtp
    assert (mtp.mtp_loss_type, mtp.mtp_loss_scaling_factor) == ("detach", 0.2)
    assert mtp.enable_rollout is True and mtp.method == "mtp" and mtp.num_speculative_tokens == 2
    assert cfg.actor_rollout_ref.actor.megatron.context_parallel_size == 1
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (4, 8)
    assert cfg.actor_rollout_ref.model.path == "/models/custom-mimo"
    assert cfg.data.train_files == "/data/custom-train.parquet"
    assert cfg.data.val_files == "/data/custom-val.parquet"
    assert cfg.trainer.default_local_dir == "/ckpts/custom"
    # Hydra overrides given on the command line come last and win.
    assert cfg.trainer.total_training_steps == 7
    assert cfg.actor_rollout_ref.actor.optim.lr == pytest.approx(3e-6)
    assert cfg.trainer.experiment_name.endswith("detach-0.2")
