"""``mtp_loss_type: null`` is verl: the same actor update through verl's own engine and through verl-mtp's.

:mod:`support.null_regime_update` builds verl's ``ActorRolloutRefWorker`` in a child process on the CPU platform
(tiny MiMo with one MTP layer), once with verl's trainer config and verl's ``MegatronEngineWithLMHead`` in verl's
registry, once with verl-mtp's config (``MtpRLConfig``, ``mtp_loss_type`` unset) and its engine, and runs the same
update in each, for verl's own MTP switches: MTP off (the checkpoint's MTP layers dropped), verl's detach
(``enable_train``, ``detach_encoder``) and verl's MTP cross-entropy into the trunk. Every gradient the optimizer
receives, every parameter after the step, the loss metrics and the bridge's Megatron-to-HF name of every parameter
must be exactly equal, and verl-mtp must leave verl's bridge instance as verl made it. It runs on every
megatron-core version of the matrix: on 0.17+ verl's own MTP cross-entropy also trains the lm_head, and it must do
so identically (the fix is the ``detach`` / ``ce`` regimes', docs/mtp_rl.md).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from verl_cpu.environment import cpu_child_env

CASES = ("mtp_off", "mtp_detach", "mtp_ce")
TESTS = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    from verl_mtp_example.tiny_model import make_tiny_mimo

    root = tmp_path_factory.mktemp("null_regime")
    model = make_tiny_mimo(str(root / "tiny_mimo"), num_mtp_layers=1)
    out = root / "updates.pt"
    env = {k: v for k, v in cpu_child_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env["PYTHONPATH"] = ":".join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "support.null_regime_update", "--model", model, "--out", str(out), *CASES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", CASES)
def test_null_regime_update_is_verls_exactly(updates, case):
    verl, ours = updates[(case, "verl")], updates[(case, "verl_mtp")]
    assert "error" not in verl, verl.get("traceback")
    assert "error" not in ours, ours.get("traceback")
    assert verl["engine_class"] == "verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead"
    assert ours["engine_class"].startswith("verl_mtp."), ours["engine_class"]
    assert (verl["mtp_config_class"], ours["mtp_config_class"]) == ("MtpConfig", "MtpRLConfig")

    assert set(verl["grads"]) == set(ours["grads"]) and verl["grads"], sorted(verl["grads"])
    for name, grad in verl["grads"].items():
        assert grad is not None and torch.equal(grad, ours["grads"][name]), name
    for name, param in verl["params"].items():
        assert torch.equal(param, ours["params"][name]), name
    assert verl["metrics"] == ours["metrics"]
    assert verl["mappings"] == ours["mappings"] and len(verl["mappings"]) == len(verl["grads"])
    assert not verl["bridge_own_mapping"] and not ours["bridge_own_mapping"]


def test_the_cases_train_what_verl_trains(updates):
    """The comparison is not vacuous: MTP off has no MTP parameter, detach leaves the trunk's gradients as MTP off
    and gives the MTP layer one, the cross-entropy changes the trunk's; and the lm_head learns from verl's MTP
    cross-entropy exactly on megatron-core 0.17+ (verl's behaviour there, which null keeps)."""
    off, detach, ce = (updates[(case, "verl")]["grads"] for case in CASES)
    lm_head = next(name for name in off if name.endswith("output_layer.weight"))
    since_0_17 = Version(version("megatron-core")) >= Version("0.17")
    assert updates["translated_mtp_names"] == since_0_17
    assert (not torch.equal(off[lm_head], detach[lm_head])) == since_0_17
    assert not any(".mtp." in name for name in off)
    mtp = [name for name in detach if ".mtp." in name]
    assert mtp and all(detach[name].abs().sum() > 0 for name in mtp)
    decoder = [name for name in off if ".decoder." in name]
    assert all(torch.equal(off[name], detach[name]) for name in decoder)
    assert any(not torch.equal(off[name], ce[name]) for name in decoder)
