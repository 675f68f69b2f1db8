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

from layout import PRODUCT, Layout, _imports

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
        "test-support",
        "[ci] feat: CPU unit-test support for Megatron-Core GPTModel with MTP layers",
        "Test-only: a tiny GPTModel with MTP layers built and run on CPU (gloo, stand-ins for the CUDA calls and "
        "fused attention Megatron makes), multi-rank runs and a host-sync counter, installed and removed by "
        "fixtures so verl's other tests see nothing of them.",
        ("verl_cpu/",),
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
        "head-log-probs",
        "[megatron] feat: per-head MTP log-probs from the GPTModel postprocess",
        "An RL postprocess of GPTModel runs the MTP block in the same forward and scores each head's targets in "
        "chunks under the main head's temperature (no full fp32 logits), with megatron-core 0.16 to 0.19 "
        "adaptations used by the regimes.",
        (
            "verl_mtp/models/mcore/mtp_grad_fusion.py",
            "verl_mtp/models/mcore/mtp_patch.py",
            "verl_mtp/models/mcore/mtp_log_probs.py",
            "verl_mtp/models/mcore/mcore_compat.py",
            "tests/support/mtp_reference.py",
            "tests/support/checkpoint_rng.py",
            "tests/models/mcore/test_mtp_log_probs_on_cpu.py",
            "tests/models/mcore/test_mtp_patch_on_cpu.py",
            "tests/models/mcore/test_mtp_gpu_paths_on_cpu.py",
        ),
    ),
    PullRequest(
        "loss-occ",
        "[trainer] feat: MTP policy-loss term and Optimal Coefficient Calibration",
        "The MTP term (the actor's registered policy loss on each head's log-probs) and OCC's per-micro-batch "
        "coefficient lambda = lambda_plus * sum(dRL*dMTP) / (sum(dMTP^2) + eps), with its metrics.",
        (
            "verl_mtp/trainer/ppo/mtp_occ.py",
            "verl_mtp/workers/utils/",
            "tests/support/actor_config.py",
            "tests/trainer/ppo/test_mtp_occ_on_cpu.py",
            "tests/workers/utils/",
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
            "verl_mtp/trainer/ppo/mtp_occ_gradient.py",
            "verl_mtp/models/mcore/main_head_scoring.py",
            "verl_mtp/workers/engine/",
            "tests/support/",
            "tests/trainer/ppo/test_mtp_occ_gradient_on_cpu.py",
            "tests/trainer/ppo/test_mtp_occ_gradient_config_on_cpu.py",
            "tests/workers/engine/",
            "tests/models/mcore/test_mtp_gpu_defaults_on_cpu.py",
        ),
        ("engine",),
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
        if src.suffix != ".py":
            continue
        for name in _imports(repo / src):
            if name.split(".")[0] not in (PRODUCT, "verl_cpu", "support"):
                continue
            dep = max((j for mod, j in module_owner.items() if name == mod or name.startswith(mod + ".")), default=None)
            if dep is not None and dep > i:
                raise ValueError(f"{src} ({SERIES[i].slug}) imports {name}, brought later by {SERIES[dep].slug}")
    return owner
