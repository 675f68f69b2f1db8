# shellcheck shell=bash
# Shared by the recipe/mtp_rl launch scripts; source it, do not run it.
#
# Reads (all overridable from the environment):
#   MTP_MODE              a regime of verl-mtp (detach, ce, rl, ...) or rl_occ (default: rl_occ)
#   MTP_COEF              mtp_loss_scaling_factor: Megatron's MTP CE weight for detach/ce, the fixed
#                         policy-loss coefficient (split over heads) for rl; ignored by OCC (default: 0.1)
#   OCC_LAMBDA_PLUS       OCC's lambda_plus                               (default: 1.0, the paper's)
#   OCC_SCOPE             micro_batch | data_parallel                     (default: micro_batch)
#   OCC_CARRY_LAST_LAMBDA reuse the last informative lambda on signal-free micro-batches (default: False)
#   OCC_INITIAL_LAMBDA    lambda carried before the first informative micro-batch (default: 0.0)
#   SPEC_DECODE           1: vLLM speculative decoding with the model's own MTP heads (default: 0)
#   SPEC_NUM_TOKENS       draft tokens per step for SPEC_DECODE=1 (default: 1)
#   DRY_RUN               1: check the run without running it (python -m verl_mtp.trainer.main_ppo --check: every
#                         config object built, all verl-mtp checks, the parallel layout; no GPU, no Ray; exit 2
#                         with the key and the fix on a refused setting); config: print the composed, resolved
#                         config as YAML and exit (default: 0)
#   LOGGER                trainer.logger                                  (default: ["console","tensorboard"])
#   DATA_HOME             where models/, data/ and ckpts/ live             (default: ~/verl_mtp)
#
# Defines:
#   MTP_ARGS        Hydra overrides for actor_rollout_ref.model.mtp (regime, coefficient, OCC, rollout)
#   HYDRA_RUN_ARGS  "--check" when DRY_RUN=1, "--cfg job --resolve" when DRY_RUN=config, else empty
#   MTP_TAG         short name of the regime for experiment names
#   mtp_rl_paper_defaults    the paper's budget and DAPO settings for every variable not set yet
#   mtp_rl_launch            runs the trainer with all of the above, then its own arguments
#   mtp_rl_overrides         the Hydra overrides every recipe passes, from the variables the script sets
#                            (DATA_ARGS, ALGORITHM_ARGS, ACTOR_ARGS, REF_ARGS, ROLLOUT_ARGS, TRAINER_ARGS)

MTP_MODE=${MTP_MODE:-rl_occ}
MTP_COEF=${MTP_COEF:-0.1}
OCC_LAMBDA_PLUS=${OCC_LAMBDA_PLUS:-1.0}
OCC_SCOPE=${OCC_SCOPE:-micro_batch}
OCC_CARRY_LAST_LAMBDA=${OCC_CARRY_LAST_LAMBDA:-False}
OCC_INITIAL_LAMBDA=${OCC_INITIAL_LAMBDA:-0.0}
SPEC_DECODE=${SPEC_DECODE:-0}
SPEC_NUM_TOKENS=${SPEC_NUM_TOKENS:-1}
DRY_RUN=${DRY_RUN:-0}
LOGGER=${LOGGER:-'["console","tensorboard"]'}
DATA_HOME=${DATA_HOME:-${HOME}/verl_mtp}

_mtp_prefix=actor_rollout_ref.model.mtp

# MTP_MODE is one of verl-mtp's regimes (actor_rollout_ref.model.mtp.mtp_loss_type; the trainer, and DRY_RUN=1's
# --check, refuse a name its registry does not hold, naming the registered ones), or rl_occ: the rl regime with
# OCC setting the coefficient. Every regime loads the MTP layers and trains them; what differs is where the MTP
# gradient may go and which loss drives it. verl's own switches are set to what the regime requires
# (enable_train=True; detach_encoder=True for detach only): the trainer refuses a contradiction, never rewrites it.
case "${MTP_MODE}" in
    rl_occ)
        _mtp_type=rl
        _occ_enable=True
        MTP_TAG="rl-occ-${OCC_LAMBDA_PLUS}"
        ;;
    *)
        _mtp_type=${MTP_MODE}
        _occ_enable=False
        MTP_TAG="${MTP_MODE}-${MTP_COEF}"
        ;;
esac
# verl's detach_encoder as the regime requires it, read from the regime list the trainer registers
# (verl_mtp/workers/config/mtp_regimes.yaml in this checkout); a name the list lacks is left to the trainer, which
# refuses it naming the registered regimes.
_regimes_file="$(dirname "${BASH_SOURCE[0]}")/../../verl_mtp/workers/config/mtp_regimes.yaml"
_detach_encoder=$(sed -nE "s/^${_mtp_type}: \{detach_encoder: (true|false),.*/\1/p" "${_regimes_file}")
_detach_encoder=${_detach_encoder:-false}

MTP_ARGS=(
    "${_mtp_prefix}.enable=True"
    "${_mtp_prefix}.enable_train=True"
    "${_mtp_prefix}.detach_encoder=${_detach_encoder}"
    "${_mtp_prefix}.mtp_loss_type=${_mtp_type}"
    "${_mtp_prefix}.mtp_loss_scaling_factor=${MTP_COEF}"
    "${_mtp_prefix}.occ.enable=${_occ_enable}"
    "${_mtp_prefix}.occ.lambda_plus=${OCC_LAMBDA_PLUS}"
    "${_mtp_prefix}.occ.scope=${OCC_SCOPE}"
    "${_mtp_prefix}.occ.carry_last_lambda=${OCC_CARRY_LAST_LAMBDA}"
    "${_mtp_prefix}.occ.initial_lambda=${OCC_INITIAL_LAMBDA}"
)

# Optional: draft tokens with the (jointly trained) MTP heads during rollout, vLLM's "mtp" method.
case "${SPEC_DECODE}" in
    1|true|True)
        MTP_ARGS+=(
            "${_mtp_prefix}.enable_rollout=True"
            "${_mtp_prefix}.method=mtp"
            "${_mtp_prefix}.num_speculative_tokens=${SPEC_NUM_TOKENS}"
        )
        ;;
    0|false|False)
        MTP_ARGS+=("${_mtp_prefix}.enable_rollout=False")
        ;;
    *)
        echo "SPEC_DECODE=${SPEC_DECODE} is not 0 or 1" >&2
        exit 2
        ;;
esac

HYDRA_RUN_ARGS=()
case "${DRY_RUN}" in
    0) ;;
    # Everything the run would check and build at start-up, on this machine's CPU (no Ray, no GPU).
    1) HYDRA_RUN_ARGS=(--check) ;;
    # Compose and resolve the whole config, print it as YAML on stdout and exit (no Ray, no GPU).
    config) HYDRA_RUN_ARGS=(--cfg job --resolve) ;;
    *)
        echo "DRY_RUN=${DRY_RUN} is not 0, 1 or config" >&2
        exit 2
        ;;
esac

# The paper's shared budget (DAPO-Math-17k / AIME-2024, 128 prompts x 16 responses, 200 steps, 2k + 8k tokens) and
# its DAPO algorithm, as defaults for every variable the calling script (or the environment) has not set. A
# script sets what is its own (model, cluster, layout, a different algorithm) first, then calls this.
# Needs EXP_NAME (for CKPTS_DIR).
mtp_rl_paper_defaults() {
    : "${PROJECT_NAME:=verl_mtp_rl}"
    : "${GPUS_PER_NODE:=8}"
    : "${TRAIN_FILE:=${DATA_HOME}/data/dapo-math-17k.parquet}"
    : "${VAL_FILE:=${DATA_HOME}/data/aime-2024.parquet}"
    : "${CKPTS_DIR:=${DATA_HOME}/ckpts/${PROJECT_NAME}/${EXP_NAME}}"
    : "${MAX_PROMPT_LENGTH:=2048}"
    : "${MAX_RESPONSE_LENGTH:=8192}"
    : "${OVERLONG_BUFFER_LEN:=4096}"
    : "${OVERLONG_PENALTY_FACTOR:=1.0}"
    : "${TRAIN_PROMPT_BSZ:=128}"
    : "${N_RESP_PER_PROMPT:=16}"
    : "${TRAIN_PROMPT_MINI_BSZ:=32}"
    : "${LR:=1e-6}"
    # DAPO's policy loss: PPO's token-level clip (verl's vanilla) with the clip-higher range.
    : "${CLIP_RATIO_LOW:=0.2}"
    : "${CLIP_RATIO_HIGH:=0.28}"
    : "${CLIP_RATIO_C:=10.0}"
    : "${POLICY_LOSS_MODE:=vanilla}"
    : "${LOSS_AGG_MODE:=token-mean}"
    # DAPO dynamic sampling: drop groups whose responses all score the same and refill the batch.
    : "${FILTER_GROUPS:=True}"
    : "${FILTER_GROUPS_METRIC:=acc}"
    : "${FILTER_MAX_INFLIGHT:=1}"
    : "${TOTAL_STEPS:=200}"
    : "${TEMPERATURE:=1.0}"
    : "${VAL_TOP_P:=0.7}"
    : "${VAL_N:=32}"  # avg@32, as the paper reports
    : "${OFFLOAD:=True}"
    # Weights are converted by mbridge (the legacy backend, vanilla_mbridge=True, which has MiMo and GLM-4.5
    # support and is the bridge this project installs). Set False for Megatron-Bridge.
    : "${VANILLA_MBRIDGE:=True}"
}

# The overrides the three recipes share, one array per block of the config, built from the variables the
# calling script has set at its top (paths, the paper's budget, its algorithm and parallel layout):
#   paths        MODEL_PATH TRAIN_FILE VAL_FILE CKPTS_DIR PROJECT_NAME EXP_NAME
#   cluster      NNODES GPUS_PER_NODE
#   model        TRUST_REMOTE_CODE (data and model)
#   algorithm    MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH OVERLONG_BUFFER_LEN OVERLONG_PENALTY_FACTOR
#                TRAIN_PROMPT_BSZ N_RESP_PER_PROMPT TRAIN_PROMPT_MINI_BSZ LR CLIP_RATIO_LOW CLIP_RATIO_HIGH
#                CLIP_RATIO_C POLICY_LOSS_MODE LOSS_AGG_MODE FILTER_GROUPS FILTER_GROUPS_METRIC
#                FILTER_MAX_INFLIGHT TOTAL_STEPS TEMPERATURE VAL_TOP_P VAL_N
#   layout       TRAIN_TP TRAIN_PP TRAIN_CP GEN_TP GEN_GPU_MEMORY_UTILIZATION OFFLOAD VANILLA_MBRIDGE
# All are required (set -u stops on a missing one).
# Model-specific overrides (e.g. expert parallelism) stay in the script, next to these arrays.
mtp_rl_overrides() {
    local max_seq_len=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH ))
    local actor_max_token_len=$(( max_seq_len * 2 ))
    local infer_max_token_len=$(( max_seq_len * 3 ))

    DATA_ARGS=(
        data.train_files="${TRAIN_FILE}"
        data.val_files="${VAL_FILE}"
        data.prompt_key=prompt
        data.truncation=left
        data.max_prompt_length="${MAX_PROMPT_LENGTH}"
        data.max_response_length="${MAX_RESPONSE_LENGTH}"
        data.train_batch_size="${TRAIN_PROMPT_BSZ}"
        data.trust_remote_code="${TRUST_REMOTE_CODE}"
    )

    # GRPO advantages, no critic, no KL; DAPO's dynamic sampling (FILTER_GROUPS) and its reward manager with
    # the overlong-buffer penalty.
    ALGORITHM_ARGS=(
        algorithm.adv_estimator=grpo
        critic.enable=False
        algorithm.use_kl_in_reward=False
        algorithm.kl_ctrl.kl_coef=0.0
        algorithm.filter_groups.enable="${FILTER_GROUPS}"
        algorithm.filter_groups.metric="${FILTER_GROUPS_METRIC}"
        algorithm.filter_groups.max_inflight_gen_batches="${FILTER_MAX_INFLIGHT}"
        reward.reward_manager.name=dapo
        +reward.reward_kwargs.overlong_buffer_cfg.enable=True
        +reward.reward_kwargs.overlong_buffer_cfg.len="${OVERLONG_BUFFER_LEN}"
        +reward.reward_kwargs.overlong_buffer_cfg.penalty_factor="${OVERLONG_PENALTY_FACTOR}"
        +reward.reward_kwargs.overlong_buffer_cfg.log=False
        +reward.reward_kwargs.max_resp_len="${MAX_RESPONSE_LENGTH}"
    )

    ACTOR_ARGS=(
        actor_rollout_ref.model.path="${MODEL_PATH}"
        actor_rollout_ref.model.trust_remote_code="${TRUST_REMOTE_CODE}"
        actor_rollout_ref.actor.strategy=megatron
        actor_rollout_ref.actor.optim.lr="${LR}"
        actor_rollout_ref.actor.optim.lr_warmup_steps=10
        actor_rollout_ref.actor.optim.weight_decay=0.1
        actor_rollout_ref.actor.optim.clip_grad=1.0
        actor_rollout_ref.actor.ppo_mini_batch_size="${TRAIN_PROMPT_MINI_BSZ}"
        actor_rollout_ref.actor.use_dynamic_bsz=True
        actor_rollout_ref.actor.ppo_max_token_len_per_gpu="${actor_max_token_len}"
        actor_rollout_ref.actor.clip_ratio_low="${CLIP_RATIO_LOW}"
        actor_rollout_ref.actor.clip_ratio_high="${CLIP_RATIO_HIGH}"
        actor_rollout_ref.actor.clip_ratio_c="${CLIP_RATIO_C}"
        actor_rollout_ref.actor.policy_loss.loss_mode="${POLICY_LOSS_MODE}"
        actor_rollout_ref.actor.loss_agg_mode="${LOSS_AGG_MODE}"
        actor_rollout_ref.actor.entropy_coeff=0
        actor_rollout_ref.actor.use_kl_loss=False
        actor_rollout_ref.actor.kl_loss_coef=0.0
        actor_rollout_ref.actor.megatron.use_mbridge=True
        actor_rollout_ref.actor.megatron.vanilla_mbridge="${VANILLA_MBRIDGE}"
        actor_rollout_ref.actor.megatron.tensor_model_parallel_size="${TRAIN_TP}"
        actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="${TRAIN_PP}"
        actor_rollout_ref.actor.megatron.context_parallel_size="${TRAIN_CP}"
        actor_rollout_ref.actor.megatron.param_offload="${OFFLOAD}"
        actor_rollout_ref.actor.megatron.optimizer_offload="${OFFLOAD}"
        # Every checkpoint also holds the trained model in Hugging Face format, MTP layers included
        # (model/huggingface/, written through the bridge): what python -m verl_mtp.model_merger exports.
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
    )

    REF_ARGS=(
        actor_rollout_ref.ref.megatron.tensor_model_parallel_size="${TRAIN_TP}"
        actor_rollout_ref.ref.megatron.pipeline_model_parallel_size="${TRAIN_PP}"
        actor_rollout_ref.ref.megatron.context_parallel_size="${TRAIN_CP}"
        actor_rollout_ref.ref.megatron.param_offload="${OFFLOAD}"
        actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
        actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="${infer_max_token_len}"
    )

    ROLLOUT_ARGS=(
        actor_rollout_ref.rollout.name=vllm
        actor_rollout_ref.rollout.n="${N_RESP_PER_PROMPT}"
        actor_rollout_ref.rollout.tensor_model_parallel_size="${GEN_TP}"
        actor_rollout_ref.rollout.gpu_memory_utilization="${GEN_GPU_MEMORY_UTILIZATION}"
        actor_rollout_ref.rollout.enable_chunked_prefill=True
        actor_rollout_ref.rollout.max_num_batched_tokens="${max_seq_len}"
        actor_rollout_ref.rollout.temperature="${TEMPERATURE}"
        actor_rollout_ref.rollout.top_p=1.0
        actor_rollout_ref.rollout.top_k=-1
        actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
        actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="${infer_max_token_len}"
        actor_rollout_ref.rollout.val_kwargs.do_sample=True
        actor_rollout_ref.rollout.val_kwargs.temperature="${TEMPERATURE}"
        actor_rollout_ref.rollout.val_kwargs.top_p="${VAL_TOP_P}"
        actor_rollout_ref.rollout.val_kwargs.top_k=-1
        actor_rollout_ref.rollout.val_kwargs.n="${VAL_N}"
    )

    TRAINER_ARGS=(
        trainer.logger="${LOGGER}"
        trainer.project_name="${PROJECT_NAME}"
        trainer.experiment_name="${EXP_NAME}"
        trainer.nnodes="${NNODES}"
        trainer.n_gpus_per_node="${GPUS_PER_NODE}"
        trainer.default_local_dir="${CKPTS_DIR}"
        trainer.total_training_steps="${TOTAL_STEPS}"
        trainer.total_epochs=100
        trainer.val_before_train=True
        trainer.test_freq=10
        trainer.save_freq=50
        trainer.resume_mode=auto
        trainer.log_val_generations=10
    )
}

# verl-mtp's trainer with the blocks mtp_rl_overrides built (plus what the script appended to them) and the regime;
# the script's own arguments come last, so they win.
mtp_rl_launch() {
    python3 -m verl_mtp.trainer.main_ppo "${HYDRA_RUN_ARGS[@]}" \
        "${DATA_ARGS[@]}" \
        "${ALGORITHM_ARGS[@]}" \
        "${ACTOR_ARGS[@]}" \
        "${REF_ARGS[@]}" \
        "${ROLLOUT_ARGS[@]}" \
        "${MTP_ARGS[@]}" \
        "${TRAINER_ARGS[@]}" \
        "$@"
}
