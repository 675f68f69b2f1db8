"""The gradient estimator inside verl's real Megatron actor (``verl_cpu.engine_smoke``, 2 updates, 2-head MiMo).

* ``occ.estimator=gradient``: every update logs ``actor/mtp_k/occ_grad_*`` and the coefficient the update used
  (``actor/mtp_k/lambda``) is the estimator's ``occ_grad_lambda``, with the proxy's logged beside it.
* ``occ.estimator=proxy`` with ``occ.diagnose_every=2``: the diagnostics appear on the 2nd update only, and the
  coefficient stays the proxy's (no ``occ_proxy_lambda`` key: ``lambda`` is the proxy).
"""

import math
import re

import pytest
from support.engine_smoke import run_engine_smoke

GRAD_NAMES = ("occ_grad_c", "occ_grad_v2", "occ_grad_cos", "occ_grad_lambda", "occ_grad_nonfinite")


@pytest.fixture(scope="module")
def tiny_mimo_dir(tmp_path_factory):
    from verl_mtp_example.tiny_model import make_tiny_mimo

    return make_tiny_mimo(str(tmp_path_factory.mktemp("tiny_mimo")), num_mtp_layers=2)




def metric_steps(out: str, key: str) -> list[list[float]]:
    """Every printed value list of ``key``, one per update."""
    rows = re.findall(rf"^\s+{re.escape(key)}: \[(.*)\]$", out, flags=re.M)
    return [[float(x.strip().rstrip(")")) for x in r.replace("np.float64(", "").split(",")] for r in rows]


def smoke(model_dir, *occ_overrides):
    proc, out = run_engine_smoke(
        model_dir,
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        "actor_rollout_ref.model.trust_remote_code=True",
        *(f"actor_rollout_ref.model.mtp.occ.{o}" for o in occ_overrides),
    )
    assert proc.returncode == 0, out[-4000:]
    assert len(re.findall(r"\[engine_smoke\] step \d+", out)) == 2, out[-2000:]
    return out


def test_gradient_estimator_sets_the_coefficient_of_every_update(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=True", "estimator=gradient", "lambda_plus_gradient=0.5")
    for k in (1, 2):
        for name in GRAD_NAMES:
            steps = metric_steps(out, f"actor/mtp_{k}/{name}")
            assert len(steps) == 2 and all(len(s) == 1 and math.isfinite(s[0]) for s in steps), (k, name, steps)
        used = metric_steps(out, f"actor/mtp_{k}/lambda")
        grad = metric_steps(out, f"actor/mtp_{k}/occ_grad_lambda")
        for u, g in zip(used, grad, strict=True):
            assert all(x == pytest.approx(g[0], rel=1e-5, abs=1e-9) for x in u), (k, used, grad)
        c = metric_steps(out, f"actor/mtp_{k}/occ_grad_c")
        v2 = metric_steps(out, f"actor/mtp_{k}/occ_grad_v2")
        for c_s, v_s, g_s in zip(c, v2, grad, strict=True):
            assert v_s[0] > 0 and g_s[0] == pytest.approx(0.5 * c_s[0] / (v_s[0] + 1e-8), rel=1e-4)
        assert len(metric_steps(out, f"actor/mtp_{k}/occ_proxy_lambda")) == 2


def test_diagnostics_appear_only_on_every_nth_update_and_keep_the_proxy(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=True", "diagnose_every=2")
    steps = out.split("[engine_smoke] step ")[1:]
    assert len(steps) == 2
    for k in (1, 2):
        for name in GRAD_NAMES:
            key = f"actor/mtp_{k}/{name}:"
            assert key not in steps[0] and key in steps[1], (k, name)
        assert f"actor/mtp_{k}/occ_proxy_lambda" not in out
        assert len(metric_steps(out, f"actor/mtp_{k}/lambda")) == 2
