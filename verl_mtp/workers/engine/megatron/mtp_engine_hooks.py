"""What the MTP regimes add to verl's Megatron LM engine, as plain functions of the engine.

The engine calls each hook at one point of its own methods (a subclass of verl's ``MegatronEngineWithLMHead``
made only of these calls, or verl's class itself), so that the behaviour lives in one place whichever class
carries the calls. The state the hooks keep is one object, ``engine.mtp_state``
(:class:`~verl_mtp.workers.engine.megatron.mtp_engine_state.MtpEngineState`), made by :func:`init_mtp_state`.

verl's own ``enable_train`` / ``detach_encoder`` are read by verl as given (the config requires the regime's
values of them). For a regime trained by the policy loss (``rl``) the hooks:

1. install one RL postprocess per model chunk (:mod:`verl_mtp.models.mcore.mtp_patch`) after verl's own MTP
   patch, keeping the chunk -> postprocess map;
2. in the logits processor, score each head's targets (``x[i+k+1]``, packed by verl's own packing like the
   main labels) under the main head's temperature, so verl unpacks the per-head log-probs exactly like the
   main ones (TP padding, context-parallel gather);
3. shift the unpacked per-head outputs right by ``k`` onto the main head's positions, with a valid mask;
4. add the OCC-scaled MTP policy term to verl's actor loss;
5. with ``occ.estimator=gradient`` (every update) or ``occ.diagnose_every=N`` (every N-th), run the gradient
   estimator (:mod:`verl_mtp.trainer.ppo.mtp_occ_gradient`) before the update: the mini-batch's forward/backward
   once with the RL loss alone and once per head with that head's unit-coefficient MTP loss, through Megatron's
   pipeline schedule like the update itself, then the update with the estimator's lambdas (``gradient``) or
   the proxy's (diagnostics only).

With verl's ``actor_rollout_ref.model.use_fused_kernels=True`` and a regime they score the main head in chunks
(:mod:`verl_mtp.models.mcore.main_head_scoring`) where verl would turn its fused kernels off because MTP is on:
verl's non-fused forward keeps running the MTP block, the main head's output-layer call is captured, and the
logits processor scores its hidden states with the chunked function the MTP heads use.

With a regime, on every megatron-core version, they also keep verl's own MTP cross-entropy (``detach``, ``ce``)
off the lm_head, as verl does on 0.16, let the MTP layers run under full recompute on 0.18.0 and let verl's vanilla
mbridge load MTP weights under 0.17+'s names (:mod:`verl_mtp.models.mcore.mcore_compat`). Without a regime
(``mtp_loss_type=null``, the default) no hook changes anything: the engine is verl's, verl's own behaviour on
every version included (docs/mtp_rl.md, "mtp_loss_type: null").
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from megatron.core import parallel_state as mpu

import verl.models.mcore.mtp_patch as verl_mtp_patch
from verl.utils.megatron_utils import unwrap_model
from verl_mtp.models.mcore.main_head_scoring import MainHeadCapture, score_main_head
from verl_mtp.models.mcore.mcore_compat import (
    adapt_mbridge_mtp_names,
    keep_mtp_ce_off_lm_head,
    let_mtp_layers_recompute,
)
from verl_mtp.models.mcore.mtp_alignment import (
    align_mtp_outputs,
    drop_mtp_outputs,
    mtp_channel_keys,
    split_mtp_channels,
    stack_mtp_channels,
)
from verl_mtp.models.mcore.mtp_head_labels import bshd_sequence_ids, head_targets, thd_sequence_ids
from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads
from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess
from verl_mtp.trainer.ppo.mtp_occ import OCCState
from verl_mtp.trainer.ppo.mtp_occ_gradient import (
    GradientSnapshot,
    gradient_occ,
    gradient_occ_metrics,
    head_products,
    shared_trunk_parameters,
)
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.config.mtp import check_fused_main_head_settings, check_megatron_mtp_settings
from verl_mtp.workers.config.mtp_run_checks import check_mtp_megatron_layout
from verl_mtp.workers.engine.megatron.mtp_engine_state import MtpEngineState
from verl_mtp.workers.engine.megatron.mtp_occ_checkpoint import load_occ_state_file, save_occ_state_file
from verl_mtp.workers.utils.losses import mtp_head_only_loss, with_mtp_policy_loss

logger = logging.getLogger(__name__)

__all__ = [
    "init_mtp_state",
    "check_mtp_rl_layout",
    "install_mtp_rl",
    "adapt_bridge",
    "forward_backward_batch",
    "add_mtp_head_scores",
    "align_outputs",
    "save_occ_state",
    "load_occ_state",
    "mtp_loss_function",
    "enable_fused_main_head",
    "install_fused_main_head",
    "scores_main_head_fused",
    "fused_lm_head_logits_processor",
    "fused_main_head_scores",
]


def init_mtp_state(engine) -> None:
    """The per-engine state of the hooks (after verl's ``__init__``)."""
    engine.mtp_state = MtpEngineState()


def has_regime(engine) -> bool:
    """Whether ``mtp_loss_type`` names a regime: without one, no hook changes anything of verl's."""
    mtp = engine.model_config.mtp
    return isinstance(mtp, MtpRLConfig) and mtp.regime is not None


def is_mtp_rl(engine) -> bool:
    """Whether this engine trains the MTP heads with the policy loss (``mtp_loss_type=rl``)."""
    mtp = engine.model_config.mtp
    return isinstance(mtp, MtpRLConfig) and mtp.is_rl


def check_mtp_rl_layout(engine, data_parallel_size: int = 1) -> None:
    """Refuse the layouts the regime cannot train right (:func:`check_mtp_megatron_layout`, the checks the
    trainer's ``--check`` also runs): before anything is built, dynamic context parallelism; once the data-parallel
    size is known, the gradient estimator with Megatron's distributed optimizer."""
    mtp = engine.model_config.mtp
    if isinstance(mtp, MtpRLConfig):
        check_mtp_megatron_layout(mtp, engine.engine_config, data_parallel_size)


def install_mtp_rl(engine) -> None:
    """After verl built and patched the model, with a regime: check the model, then install the regime's
    per-chunk pieces."""
    if not has_regime(engine):
        return
    mtp = engine.model_config.mtp
    for chunk in engine.module:
        check_megatron_mtp_settings(mtp, unwrap_model(chunk).config)
        let_mtp_layers_recompute(chunk)
    if is_mtp_rl(engine):
        check_mtp_rl_layout(engine, engine.get_data_parallel_size())
        engine.mtp_state.occ_state = OCCState(mtp.occ)
        for chunk in engine.module:
            engine.mtp_state.rl_postprocess[chunk] = MTPRLPostprocess(
                train_lm_head=mtp.train_lm_head,
                logprob_chunk_size=mtp.logprob_chunk_size,
                detached_head_ce=mtp.detached_head_ce_coef > 0,
            ).patch(chunk)
    else:  # verl's MTP cross-entropy (detach / ce) must not train the lm_head
        for chunk in engine.module:
            keep_mtp_ce_off_lm_head(chunk)


def adapt_bridge(engine) -> None:
    """After verl built the transformer config, before it loads the weights through its mbridge (with a regime)."""
    if has_regime(engine) and getattr(engine, "bridge", None) is not None:
        adapt_mbridge_mtp_names(engine.bridge)


def forward_backward_batch(engine, run, data, loss_function, forward_only: bool):
    """verl's ``forward_backward_batch`` (``run``), preceded on the gradient estimator's updates by its passes
    (see the module docstring)."""
    if forward_only or loss_function is None or not is_mtp_rl(engine):
        return run(data, loss_function, forward_only=forward_only)
    occ, state = engine.model_config.mtp.occ, engine.mtp_state
    state.updates += 1
    diagnose = occ.diagnose_every > 0 and state.updates % occ.diagnose_every == 0
    if occ.estimator != "gradient" and not diagnose:
        return run(data, loss_function)
    stats = _gradient_occ(engine, run, data, loss_function)
    lam, nonfinite = stats.lambdas(occ.lambda_plus_gradient, occ.eps, occ.max_abs_lambda)
    state.coefficients = lam if occ.estimator == "gradient" else None
    state.diagnosed = True
    try:
        output = run(data, loss_function)
    finally:
        state.coefficients, state.diagnosed = None, False
    if "metrics" in output:
        output["metrics"].update(gradient_occ_metrics(stats, lam, nonfinite))  # one per update, as verl merges them
    return output


def _gradient_occ(engine, run, data, loss_function):
    """The gradient estimator's statistics for this mini-batch; leaves the gradients zeroed."""
    mtp, state = engine.model_config.mtp, engine.mtp_state
    params = shared_trunk_parameters([unwrap_model(chunk) for chunk in engine.module], mtp.train_lm_head)
    per_head = []
    try:
        state.loss_mode = "rl"
        engine.optimizer_zero_grad()
        run(data, loss_function)
        rl = GradientSnapshot.take(params)
        for k in range(1, engine.tf_config.mtp_num_layers + 1):
            state.loss_mode = k
            engine.optimizer_zero_grad()
            run(data, loss_function)
            per_head.append(head_products(rl, params))
    finally:
        state.loss_mode = None
        engine.optimizer_zero_grad()
    return gradient_occ(per_head)


def _pop_mtp_output(engine):
    """The postprocess that ran the heads in this micro-batch's forward and its output, else ``(None, None)``.

    Only the chunk that holds the output layer (``post_process``) leaves an output, and its logits
    processor runs before the next forward. An engine made without ``__init__`` (as verl's own unit tests of
    the logits processor make one) has installed none.
    """
    state = getattr(engine, "mtp_state", None)
    for postprocess in state.rl_postprocess.values() if state is not None else ():
        output = postprocess.pop_output()
        if output is not None:
            return postprocess, output
    return None, None


def add_mtp_head_scores(engine, ret: dict, label, temperature, batch, data_format: str) -> None:
    """In verl's logits processor, after the main head's log-probs: every MTP head's outputs, stacked as extra
    channels of ``ret["log_probs"]`` so verl unpacks them with the main ones (see ``align_outputs``)."""
    postprocess, mtp_output = _pop_mtp_output(engine)
    if mtp_output is None:
        return
    if "log_probs" not in ret:
        raise NotImplementedError(
            "mtp_loss_type=rl needs the main head's log-probs, which verl does not compute with "
            "distillation_only=True (top-k distillation without task rewards): use mtp_loss_type=detach there."
        )
    targets = _head_targets(engine, batch, postprocess.model, mtp_output, data_format)
    scored = score_mtp_heads(mtp_output, [t.view_as(label) for t in targets], temperature)
    ret["log_probs"] = stack_mtp_channels(ret["log_probs"], scored, _channel_keys(engine))


def _channel_keys(engine) -> list[str]:
    return mtp_channel_keys(engine.tf_config.mtp_num_layers, engine.model_config.mtp.detached_head_ce_coef > 0)


def _head_targets(engine, batch, gpt, mtp_output, data_format: str) -> list:
    """Each head's targets in the packed layout of this micro-batch, from the layout verl gave the model."""
    positions, params = mtp_output.positions, mtp_output.packed_seq_params
    if positions is None or positions.dim() != 2:
        raise NotImplementedError(
            "mtp_loss_type=rl needs the per-token position ids verl passes with MTP training (a text model); "
            f"got {None if positions is None else tuple(positions.shape)}"
        )
    if data_format == "thd":
        sequence_ids = thd_sequence_ids(
            params.cu_seqlens_q_padded,
            positions.shape[-1],
            mpu.get_context_parallel_world_size(),
            mpu.get_context_parallel_rank(),
            engine._get_context_parallel_layout(gpt),
        )[None]
    else:
        sequence_ids = bshd_sequence_ids(*positions.shape, positions.device)
    return head_targets(batch["input_ids"], sequence_ids, positions, mtp_output.num_heads)


def align_outputs(engine, output: dict) -> dict:
    """verl's unpacked model outputs with the MTP heads' split off the log-probs and shifted onto the main
    head's positions."""
    if not is_mtp_rl(engine):
        return output
    return align_mtp_outputs(split_mtp_channels(output, _channel_keys(engine)))


def save_occ_state(engine, local_path: str) -> None:
    """This rank's OCC state (:mod:`~verl_mtp.workers.engine.megatron.mtp_occ_checkpoint`), before verl's
    checkpoint (MTP weights are part of the Megatron model state).

    It goes first: verl's checkpoint manager uploads ``local_path`` to ``hdfs_path``
    (``trainer.default_hdfs_dir``) at the end of its own save, and the state must be in that copy.
    """
    if is_mtp_rl(engine):
        save_occ_state_file(engine.mtp_state.occ_state, local_path)


def load_occ_state(engine, local_path: str) -> None:
    """Read before verl's own load (verl may delete the local copy after loading), where this run uses it: OCC's
    lambdas carried across signal-free micro-batches (``occ.enable`` with ``occ.carry_last_lambda``)."""
    occ = engine.model_config.mtp.occ
    if is_mtp_rl(engine) and occ.enable and occ.carry_last_lambda:
        load_occ_state_file(engine.mtp_state.occ_state, local_path)


def mtp_loss_function(engine, loss_function, forward_only: bool):
    """verl's actor loss as the current pass needs it (see ``MtpEngineState.loss_mode``)."""
    if not is_mtp_rl(engine) or loss_function is None or forward_only:
        return loss_function
    state, mtp = engine.mtp_state, engine.model_config.mtp
    if state.loss_mode == "rl":
        return loss_function
    if state.loss_mode is not None:
        return mtp_head_only_loss(loss_function, mtp, state.loss_mode)
    loss = with_mtp_policy_loss(loss_function, mtp, state.occ_state, state.coefficients, diagnosed=state.diagnosed)
    return partial(_consuming_mtp_outputs, loss)


def _consuming_mtp_outputs(loss_function, model_output: dict, data, dp_group=None):
    """The loss, after which the per-head outputs leave the model output: verl keeps the model output of every
    micro-batch and joins them per key at the end of the update (a host read per key and micro-batch), and
    nothing reads the heads' there."""
    try:
        return loss_function(model_output=model_output, data=data, dp_group=dp_group)
    finally:
        drop_mtp_outputs(model_output)


def enable_fused_main_head(engine) -> bool:
    """In place of verl's ``_maybe_enable_fused_kernels``: with ``use_fused_kernels`` and a regime, score the main
    head in chunks instead of turning the fused kernels off because MTP is on; ``False`` leaves it to verl.

    verl's non-fused forward stays, since it is the one that runs the MTP block: ``engine_config.use_fused_kernels``
    goes to False as verl sets it, so its ``forward_step`` and the worker's batches agree, and the main head's
    output-layer call is captured once the model is patched (:func:`install_fused_main_head`).
    """
    mtp = engine.model_config.mtp
    if not (engine.engine_config.use_fused_kernels and isinstance(mtp, MtpRLConfig) and mtp.regime is not None):
        return False
    check_fused_main_head_settings(True, mtp)
    engine.mtp_state.fused_main_head = True
    engine.engine_config.use_fused_kernels = False
    logger.warning(
        "use_fused_kernels=True with mtp_loss_type=%s: verl's non-fused forward runs the MTP block and the main head "
        "is scored in chunks of %d tokens (no full logits)", mtp.mtp_loss_type, mtp.logprob_chunk_size,
    )
    return True


def install_fused_main_head(engine) -> None:
    """After verl's MTP patch and the regime's postprocess: capture the main head where the output layer is."""
    if not engine.mtp_state.fused_main_head:
        return
    for chunk in engine.module:
        if getattr(verl_mtp_patch._get_patching_model(chunk), "output_layer", None) is not None:
            capture = MainHeadCapture(engine.model_config.mtp.logprob_chunk_size)
            engine.mtp_state.main_head_capture[chunk] = capture.patch(chunk)


def scores_main_head_fused(engine) -> bool:
    """Whether the logits processor scores the main head from captured hidden states (an engine made without
    ``__init__``, as verl's own unit tests make one, never does)."""
    state = getattr(engine, "mtp_state", None)
    return state is not None and state.fused_main_head


def fused_lm_head_logits_processor(engine, label, temperature, batch, data_format: str, **flags) -> dict:
    """The engine's logits processor under ``use_fused_kernels`` with a regime: the main head from its captured
    hidden states (:func:`fused_main_head_scores`, ``flags`` are verl's processor switches), then the heads."""
    ret = fused_main_head_scores(engine, label, temperature, **flags)
    add_mtp_head_scores(engine, ret, label, temperature, batch, data_format)
    return ret


def fused_main_head_scores(
    engine, label, temperature, *, calculate_sum_pi_squared: bool, calculate_entropy: bool,
    distillation_use_topk: bool, distillation_only: bool, logits_processor_func,
) -> dict:
    """verl's logits processor for the main head, from the captured hidden states instead of logits.

    ``distillation_only`` and ``logits_processor_func`` serve verl's top-k distillation only, which is refused.
    """
    if distillation_use_topk or distillation_only:
        raise NotImplementedError(
            "top-k distillation (distillation.distillation_loss.loss_mode=*_topk) reads the main head's full logits, "
            "which actor_rollout_ref.model.use_fused_kernels=True with an MTP regime never makes: set "
            "use_fused_kernels=False, or use a distillation loss without top-k."
        )
    if calculate_sum_pi_squared and torch.is_grad_enabled():
        raise NotImplementedError(
            "actor_rollout_ref.actor.calculate_sum_pi_squared is scored without gradient under "
            "use_fused_kernels=True with MTP (verl reads it from compute_log_prob); this pass computes gradients."
        )
    captured = (capture.pop_output() for capture in engine.mtp_state.main_head_capture.values())
    main = next((m for m in captured if m is not None), None)
    if main is None:
        raise RuntimeError(
            "use_fused_kernels=True with MTP: no main-head output-layer call was captured in this forward (a "
            "wrapper replaced the output layer or its weight?); set actor_rollout_ref.model.use_fused_kernels=False"
        )
    # verl's guard against padding's non-positive temperature, in place as verl does it (the MTP heads read it
    # next), without verl's host read of the result
    temperature.masked_fill_(temperature <= 0, 1e-8)
    return score_main_head(main, label, temperature, entropy=calculate_entropy, sum_pi_squared=calculate_sum_pi_squared)
