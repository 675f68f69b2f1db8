"""The upstream change as a series of pull requests, in the order a verl maintainer would merge them.

Each pull request names the files of this repository it brings (path prefixes; the layout decides where they
go in verl's tree) and the integration edits of verl's own files it makes (:data:`verl_edits.EDITS`). Every
laid-out file belongs to exactly one pull request, and a file may import only what the same or an earlier
pull request brings, so each one applies on the previous ones and its tests run without the later ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from layout import PRODUCT, TESTING, Layout, _imports

# The size a reviewer can read in one sitting; the generator reports every pull request above it.
REVIEWABLE_LINES = 800


@dataclass(frozen=True)
class PullRequest:
    slug: str
    title: str  # verl's "[modules] type: description" form
    summary: str
    sources: tuple[str, ...]  # path prefixes in this repository
    edits: tuple[str, ...] = ()  # names in verl_edits.EDITS


SERIES = (
    PullRequest(
        "config",
        "[cfg] feat: mtp_loss_type regimes and OCC config for MTP training in RL",
        "MtpConfig gains mtp_loss_type (a registry of regimes: detach, ce, rl) and the OCC block, validated only; "
        "nothing reads them yet, and with mtp_loss_type unset verl behaves as before.",
        (
            "verl_mtp/workers/config/mtp.py",
            "verl_mtp/workers/config/mtp_regimes.yaml",
            "tests/trainer/test_config_on_cpu.py",
        ),
        ("config",),
    ),
    PullRequest(
        "cuda-on-cpu",
        "[ci] feat: Megatron-Core's CUDA calls on CPU for unit tests, installed and removed by fixtures",
        "Test-only: stand-ins for the torch.cuda calls and the CUDA RNG tracker Megatron-Core makes, as patches "
        "that record what they replace and put it back, and a pytest plugin that fails a test module leaving "
        "torch.cuda or Megatron's state changed, so verl's other tests see nothing of them.",
        (
            "verl_cpu/cuda.py",
            "verl_cpu/device_module.py",
            "verl_cpu/patches.py",
            "verl_cpu/environment.py",
            "verl_cpu/testing/__init__.py",
            "tests/support/stand_in_probe.py",
        ),
    ),
    PullRequest(
        "tiny-gpt",
        "[ci] feat: a tiny Megatron-Core GPTModel with MTP layers on CPU for unit tests",
        "Test-only: a real GPTModel with K MTP layers built and run on CPU (gloo, a CPU core attention with "
        "packed sequences and context parallelism), and the module-scoped fixture that sets it up and puts back "
        "every stand-in.",
        (
            "verl_cpu/attention.py",
            "verl_cpu/context_parallel_attention.py",
            "verl_cpu/testing/tiny_gpt.py",
        ),
    ),
    PullRequest(
        "alignment",
        "[megatron] feat: MTP head targets and their alignment onto the main head's positions",
        "Each MTP head's targets packed by verl's own packing (THD, context-parallel zig-zag, padding buckets) "
        "and the shift of its outputs onto the main head's positions, never across a sequence boundary.",
        (
            "verl_mtp/models/mcore/mtp_head_labels.py",
            "verl_mtp/models/mcore/mtp_alignment.py",
            "tests/support/mtp_batches.py",
            "tests/models/mcore/test_mtp_alignment_on_cpu.py",
        ),
    ),
    PullRequest(
        "token-scores",
        "[megatron] feat: log-probs of given tokens against a vocab-parallel output layer, in chunks",
        "Log-probs, top-1, entropy and sum of squared probabilities of given tokens, chunk by chunk: fp32 logits "
        "exist for one chunk at a time, the backward turns the kept exp(logits - max) into the gradient in place "
        "and makes the weight gradient in one product (gradient-accumulation fusion kept).",
        (
            "verl_mtp/models/mcore/mtp_grad_fusion.py",
            "verl_mtp/models/mcore/token_scores.py",
            "tests/models/mcore/test_token_scores_on_cpu.py",
        ),
    ),
    PullRequest(
        "head-log-probs",
        "[megatron] feat: per-head MTP log-probs from an RL postprocess of GPTModel",
        "An RL postprocess of GPTModel runs the MTP block in the same forward and keeps each head's hidden states; "
        "each head scores its targets under the main head's temperature; the megatron-core 0.16 to 0.19 "
        "differences the regimes need.",
        (
            "verl_mtp/models/mcore/mtp_patch.py",
            "verl_mtp/models/mcore/mtp_log_probs.py",
            "verl_mtp/models/mcore/mcore_compat.py",
            "tests/support/mtp_reference.py",
            "tests/models/mcore/test_mtp_log_probs_on_cpu.py",
        ),
    ),
    PullRequest(
        "postprocess",
        "[megatron] test: the RL postprocess end to end against an independent computation",
        "The postprocess's per-head log-probs and gradients (THD and BSHD, K = 1, 2, full recompute of the MTP "
        "layers, the lm_head trained or not) against a naive computation on the same model; the same tests in a "
        "child process with the stand-in probe, so a leak into verl's CI process fails here.",
        (
            "tests/support/checkpoint_rng.py",
            "tests/models/mcore/test_mtp_patch_on_cpu.py",
            "tests/models/mcore/test_mtp_gpu_paths_on_cpu.py",
            "tests/models/mcore/test_mtp_cpu_stand_ins_on_cpu.py",
        ),
    ),
    PullRequest(
        "gpu-defaults",
        "[megatron] test: the RL postprocess under a GPU run's defaults, emulated on CPU",
        "bf16 with Float16Module, gradient-accumulation fusion (its kernel's contract on CPU), no "
        "TransformerEngine, MoE layers: the heads' log-probs and gradients still match the reference.",
        (
            "tests/support/mtp_parallel.py",
            "tests/support/grad_accumulation_fusion.py",
            "tests/support/transformer_engine_off.py",
            "tests/models/mcore/test_mtp_gpu_defaults_on_cpu.py",
        ),
    ),
    PullRequest(
        "occ",
        "[trainer] feat: Optimal Coefficient Calibration of the MTP coefficient",
        "OCC's per-micro-batch lambda = lambda_plus * sum(dRL*dMTP) / (sum(dMTP^2) + eps) with its state, and the "
        "gradient estimator (the paper's full-model calibration) as an option.",
        (
            "verl_mtp/trainer/ppo/mtp_occ.py",
            "verl_mtp/trainer/ppo/mtp_occ_gradient.py",
            "tests/trainer/ppo/test_mtp_occ_on_cpu.py",
            "tests/trainer/ppo/test_mtp_occ_gradient_config_on_cpu.py",
        ),
    ),
    PullRequest(
        "loss",
        "[trainer] feat: the MTP policy-loss term in the actor loss",
        "The actor's registered policy loss on each head's log-probs, advantages scaled by the coefficient, with "
        "verl's loss aggregation and global normalisation, and its metrics.",
        (
            "verl_mtp/workers/utils/",
            "verl_cpu/testing/actor_batch.py",
            "tests/support/actor_config.py",
            "tests/workers/utils/test_mtp_losses_on_cpu.py",
        ),
    ),
    PullRequest(
        "host-syncs",
        "[trainer] test: the MTP policy term adds no host synchronisation and refuses what it cannot honour",
        "A dispatcher-level counter of host synchronisations (item, data-dependent shapes, host reads and writes "
        "a GPU pays for) and the test that the MTP term reads its scalars back in one copy; the settings the "
        "term cannot honour are refused with the setting named.",
        (
            "verl_cpu/testing/host_syncs.py",
            "tests/workers/utils/test_mtp_loss_syncs_on_cpu.py",
            "tests/workers/config/test_mtp_settings_gaps_on_cpu.py",
        ),
    ),
    PullRequest(
        "engine",
        "[megatron] feat: mtp_loss_type in MegatronEngineWithLMHead (hooks, OCC state in checkpoints)",
        "The engine calls one hook per integration point: regime switches, the RL postprocess, per-head scores "
        "in the logits processor, the MTP term in the loss, the gradient estimator, OCC state saved with the "
        "checkpoint, the fused main head with MTP on.",
        (
            "verl_mtp/workers/config/mtp_run_checks.py",
            "verl_mtp/models/mcore/main_head_scoring.py",
            "verl_mtp/workers/engine/",
            "tests/support/engine_micro_batch.py",
            "tests/workers/engine/test_fused_main_head_on_cpu.py",
        ),
        ("engine",),
    ),
    PullRequest(
        "occ-checkpoint",
        "[megatron] test: OCC state in checkpoints (resume, remote upload, a change of ranks refused)",
        "The engine's save_checkpoint / load_checkpoint on 1 and 2 ranks: each rank's carried lambda comes back, "
        "the state is in the uploaded copy, and a resume with another number of ranks is refused with the fix.",
        (
            "verl_cpu/testing/ranks.py",
            "tests/support/occ_checkpoint_engine.py",
            "tests/workers/engine/test_mtp_occ_checkpoint",
        ),
    ),
    PullRequest(
        "gradient-estimator",
        "[trainer] test: OCC's gradient estimator through the engine's pipeline schedule",
        "The estimator's extra passes (RL loss alone, each head's loss alone) through the engine against "
        "gradients computed directly on the model.",
        ("tests/support/bare_engine.py", "tests/trainer/ppo/test_mtp_occ_gradient_on_cpu.py"),
    ),
    PullRequest(
        "tools",
        "[model_merger, data] feat: export trained MTP layers to Hugging Face, DAPO-Math data preparation",
        "The model merger keeps the MTP layers in the exported checkpoint; a preparation script for the paper's "
        "math data.",
        ("verl_mtp/model_merger/", "verl_mtp/utils/dataset/"),
    ),
    PullRequest(
        "docs",
        "[doc] feat: MTP-RL regimes and OCC in docs/advance/mtp.md, and an example launch script",
        "The regimes, the OCC keys and metrics, and what differs from the paper's code; "
        "examples/mtp_trainer/ runs the paper's main setting (MiMo-7B-RL, DAPO, OCC) with verl's trainer.",
        (),
        ("docs", "example"),
    ),
)


def _owner(src: Path) -> int:
    """The index of the pull request whose longest matching prefix names ``src``."""
    path = src.as_posix()
    matches = [(len(prefix), i) for i, pr in enumerate(SERIES) for prefix in pr.sources if path.startswith(prefix)]
    if not matches:
        raise ValueError(f"{src} is in the upstream layout but in no pull request of scripts/upstream/series.py")
    return max(matches)[1]


def assign(layout: Layout, repo: Path) -> dict[Path, int]:
    """Every laid-out file -> its pull request; refuses a file importing what only a later pull request brings."""
    owner = {src: _owner(src) for src in layout.files}
    module_owner = {}
    for src, i in owner.items():
        name = re.sub(r"(/__init__)?\.py$", "", src.as_posix()).replace("/", ".")
        module_owner[name.removeprefix("tests.")] = i
    for src, i in owner.items():
        if src.suffix != ".py" or src == Path(*TESTING.split("."), "__init__.py"):  # upstream it imports nothing
            continue
        for name in _imports(repo / src):
            if name.split(".")[0] not in (PRODUCT, "verl_cpu", "support"):
                continue
            dep = max((j for mod, j in module_owner.items() if name == mod or name.startswith(mod + ".")), default=None)
            if dep is not None and dep > i:
                raise ValueError(f"{src} ({SERIES[i].slug}) imports {name}, brought later by {SERIES[dep].slug}")
    return owner
