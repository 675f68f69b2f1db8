"""One actor update through verl's own Megatron engine and through verl-mtp's with ``mtp_loss_type`` unset.

Run in a child process (it selects the CPU platform and makes a one-rank gloo world)::

    python -m support.null_regime_update --model DIR --out FILE.pt CASE...

Per case (a set of verl's own ``actor_rollout_ref.model.mtp`` switches), twice, in one process:

* ``verl``: verl's trainer config ``ppo_megatron_trainer`` and verl's ``MegatronEngineWithLMHead`` in verl's
  ``EngineRegistry`` (verl-mtp's plugin loaded with ``import verl`` is undone for the build);
* ``verl_mtp``: verl-mtp's trainer config (``MtpRLConfig``, ``mtp_loss_type: null``) and its engine.

Each build does the same update on the same batch (verl's ``ActorRolloutRefWorker``, ``update_actor``) and records
what the comparison needs: every parameter's gradient as the optimizer receives it, every parameter after the
step, the loss metrics, the bridge's Megatron-to-HF name mapping of every parameter (its result, or the error
it raises) and whether the bridge instance carries its own mapping, and the engine's class. A build or update
that raises is recorded as that error, so a failure of verl's is compared with the product's too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback

CASES = {
    "mtp_off": ["actor_rollout_ref.model.mtp.enable=False"],
    "mtp_detach": [
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.detach_encoder=True",
    ],
    "mtp_ce": [
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.detach_encoder=False",
    ],
}
ENGINES = {
    "verl": ("verl.trainer.config", "ppo_megatron_trainer"),
    "verl_mtp": ("verl_mtp.trainer.config", "mtp_ppo_megatron_trainer"),
}
BATCH = 4


def _registered_engine(use_verl: bool) -> None:
    """verl's engine in verl's registry slots (``use_verl``), or verl-mtp's as its plugin registers it."""
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
    from verl_mtp.workers.engine.megatron.transformer_impl import MegatronMTPEngineWithLMHead
    from verl_mtp.workers.engine.registry import replace_engine

    if use_verl:
        replace_engine(MegatronMTPEngineWithLMHead, MegatronEngineWithLMHead)
    else:
        replace_engine(MegatronEngineWithLMHead, MegatronMTPEngineWithLMHead)


def _grad(param):
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    return None if grad is None else grad.detach().float().clone()


def _record_grads(engine, into: dict) -> None:
    """Wrap this engine's ``optimizer_step``: the gradients it is about to apply, per parameter name."""
    step = engine.optimizer_step

    def optimizer_step():
        for chunk in engine.module:
            for name, param in chunk.named_parameters():
                into[name] = _grad(param)
        return step()

    engine.optimizer_step = optimizer_step


def _name_mappings(engine) -> dict:
    """The bridge's HF names for every parameter of the model, or the error the mapping raises."""
    out = {}
    for chunk in engine.module:
        for name, _ in chunk.named_parameters():
            mcore_name = name
            while mcore_name.startswith("module."):  # Megatron's DDP and Float16Module wrappers
                mcore_name = mcore_name[len("module."):]
            try:
                out[mcore_name] = list(engine.bridge._weight_name_mapping_mcore_to_hf(mcore_name))
            except Exception as err:  # verl's behaviour, bugs included, is what is compared
                out[mcore_name] = f"{type(err).__name__}: {err}"
    return out


def translate_mtp_names_for_mbridge() -> bool:
    """On megatron-core 0.17+, let mbridge's MiMo bridge (every instance, either engine) map the MTP inner layer's
    new name ``mtp_model_layer`` as the old ``transformer_layer``; returns whether it was needed.

    mbridge 0.15.1 knows only the old name, so verl's own load of a MiMo checkpoint's MTP weights through its vanilla
    mbridge raises ``NotImplementedError`` there, with either engine (verl's behaviour, documented in
    docs/mtp_rl.md). Both builds then load through this same class-level translation, the test's and not the
    product's, so what is compared is still only what the product adds.
    """
    from importlib.metadata import version

    from mbridge.models.mimo import MimoBridge
    from packaging.version import Version

    if Version(version("megatron-core")) < Version("0.17"):
        return False
    to_hf = MimoBridge._weight_name_mapping_mcore_to_hf

    def mcore_to_hf(self, name: str) -> list[str]:
        return to_hf(self, name.replace(".mtp_model_layer.", ".transformer_layer."))

    MimoBridge._weight_name_mapping_mcore_to_hf = mcore_to_hf
    return True


def run_one(model_dir: str, engine_name: str, case: str) -> dict:
    import torch
    from verl.utils import tensordict_utils as tu
    from verl_cpu import engine_smoke

    _registered_engine(engine_name == "verl")
    overrides = engine_smoke.default_overrides(model_dir, BATCH) + [
        "actor_rollout_ref.model.trust_remote_code=True",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        *CASES[case],
    ]
    config = engine_smoke.compose_config(*ENGINES[engine_name], overrides)
    result: dict = {"grads": {}}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # verl prints the whole model and config
            worker = engine_smoke.build_actor(config)
        engine = worker.actor.engine
        base = type(engine).__mro__[2]  # the CPU variant is (CPUMegatronEngineMixin, the registered engine)
        result["engine_class"] = f"{base.__module__}.{base.__qualname__}"
        result["mtp_config_class"] = type(engine.model_config.mtp).__qualname__
        result["bridge_own_mapping"] = "_weight_name_mapping_mcore_to_hf" in vars(engine.bridge)
        result["mappings"] = _name_mappings(engine)
        _record_grads(engine, result["grads"])
        data = engine_smoke.synthetic_update_batch(config, engine.model_config.tokenizer, BATCH, seed=0)
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = tu.get(worker.update_actor(data), "metrics")
        result["metrics"] = {k: v for k, v in metrics.items() if "loss" in k or "grad_norm" in k}
        result["params"] = {
            name: param.detach().float().clone() for chunk in engine.module for name, param in chunk.named_parameters()
        }
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    finally:
        _registered_engine(False)
    torch.distributed.barrier()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = parser.parse_args(argv)
    from verl_cpu.environment import cpu_process_env

    os.environ.update(cpu_process_env(one_rank=True))
    import torch
    import verl  # noqa: F401  (the CPU platform, then verl-mtp's plugin)

    results = {"translated_mtp_names": translate_mtp_names_for_mbridge()}
    results.update({(case, name): run_one(args.model, name, case) for case in args.cases for name in ENGINES})
    torch.save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
