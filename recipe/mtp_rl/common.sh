# shellcheck shell=bash
# Shared by the recipe/mtp_rl launch scripts; source it, do not run it.
#
# Reads (all overridable from the environment):
#   MTP_MODE              detach | ce | rl | rl_occ                      (default: rl_occ)
#   MTP_COEF              mtp_loss_scaling_factor: Megatron's MTP CE weight for detach/ce, the fixed
#                         policy-loss coefficient (split over heads) for rl; ignored by OCC (default: 0.1)
#   OCC_LAMBDA_PLUS       OCC's lambda_plus                               (default: 1.0, the paper's)
#   OCC_SCOPE             micro_batch | data_parallel                     (default: micro_batch)
#   OCC_CARRY_LAST_LAMBDA reuse the last informative lambda on signal-free micro-batches (default: False)
#   OCC_INITIAL_LAMBDA    lambda carried before the first informative micro-batch (default: 0.0)
#   SPEC_DECODE           1: vLLM speculative decoding with the model's own MTP heads (default: 0)
#   SPEC_NUM_TOKENS       draft tokens per step for SPEC_DECODE=1 (default: 1)
#   DRY_RUN               1: print the composed, resolved config and exit; nothing runs (default: 0)
#
# Defines:
#   MTP_ARGS        Hydra overrides for actor_rollout_ref.model.mtp (regime, coefficient, OCC, rollout)
#   HYDRA_RUN_ARGS  "--cfg job --resolve" when DRY_RUN=1, else empty
#   MTP_TAG         short name of the regime for experiment names
#   mtp_rl_check_layout CP   fail early on a parallel layout the regime cannot run

MTP_MODE=${MTP_MODE:-rl_occ}
MTP_COEF=${MTP_COEF:-0.1}
OCC_LAMBDA_PLUS=${OCC_LAMBDA_PLUS:-1.0}
OCC_SCOPE=${OCC_SCOPE:-micro_batch}
OCC_CARRY_LAST_LAMBDA=${OCC_CARRY_LAST_LAMBDA:-False}
OCC_INITIAL_LAMBDA=${OCC_INITIAL_LAMBDA:-0.0}
SPEC_DECODE=${SPEC_DECODE:-0}
SPEC_NUM_TOKENS=${SPEC_NUM_TOKENS:-1}
DRY_RUN=${DRY_RUN:-0}

_mtp_prefix=actor_rollout_ref.model.mtp

# Every regime loads the MTP layers and trains them; what differs is where the MTP gradient may go
# (detach: MTP layers only; ce / rl: MTP layers and the trunk) and which loss drives it.
# enable_train / detach_encoder are written out although MtpRLConfig derives them from
# mtp_loss_type, so that the printed config (DRY_RUN=1) shows what will actually run.
case "${MTP_MODE}" in
    detach)
        _mtp_type=detach
        _detach_encoder=True
        _occ_enable=False
        MTP_TAG="detach-${MTP_COEF}"
        ;;
    ce)
        _mtp_type=ce
        _detach_encoder=False
        _occ_enable=False
        MTP_TAG="ce-${MTP_COEF}"
        ;;
    rl)
        _mtp_type=rl
        _detach_encoder=False
        _occ_enable=False
        MTP_TAG="rl-${MTP_COEF}"
        ;;
    rl_occ)
        _mtp_type=rl
        _detach_encoder=False
        _occ_enable=True
        MTP_TAG="rl-occ-${OCC_LAMBDA_PLUS}"
        ;;
    *)
        echo "MTP_MODE=${MTP_MODE} is unknown; choose one of: detach, ce, rl, rl_occ" >&2
        exit 2
        ;;
esac

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
if [[ "${DRY_RUN}" == "1" ]]; then
    # Compose and resolve the whole config, print it as YAML on stdout and exit (no Ray, no GPU).
    HYDRA_RUN_ARGS=(--cfg job --resolve)
fi

# The rl regime (rl, rl_occ) does not support context parallelism yet: the engine would stop at start-up.
# Fail here, before anything is scheduled, with the same advice.
mtp_rl_check_layout() {
    local cp=$1
    if [[ "${_mtp_type}" == "rl" && "${cp}" -gt 1 ]]; then
        echo "MTP_MODE=${MTP_MODE} (mtp_loss_type=rl) does not support context_parallel_size=${cp} > 1 yet;" \
            "use CP=1 (e.g. TP2 PP2 CP1) or MTP_MODE=detach. See docs/mtp_rl.md." >&2
        exit 2
    fi
}
