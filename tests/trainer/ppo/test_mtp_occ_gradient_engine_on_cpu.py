"""The gradient estimator inside verl's real Megatron actor (``verl_cpu.engine_smoke``, 2 updates, 2-head MiMo).

* ``occ.estimator=gradient``: every update logs ``actor/mtp_k/occ_grad_*`` and the coefficient the update used
  (``actor/mtp_k/lambda``) is the estimator's ``occ_grad_lambda``, with the proxy's logged beside it.
* ``occ.estimator=proxy`` with ``occ.diagnose_every=2``: the diagnostics appear on the 2nd update only, and the
  coefficient stays the proxy's (no ``occ_proxy_lambda`` key: ``lambda`` is the proxy), which the diagnostics'
  ``occ_grad_proxy_lambda`` (computed from the logged OCC sums) reproduces.
* a fixed coefficient (``occ.enable=False``) with diagnostics: ``lambda`` stays the fixed value and
  ``occ_grad_proxy_lambda`` is the proxy of the same update, from its logged sums.
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
        paired = metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda")
        for p_s, proxy_s in zip(paired, metric_steps(out, f"actor/mtp_{k}/occ_proxy_lambda"), strict=True):
            assert p_s == [pytest.approx(sum(proxy_s) / len(proxy_s), rel=1e-5, abs=1e-9)]  # update's mean


def test_diagnostics_appear_only_on_every_nth_update_and_keep_the_proxy(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=True", "diagnose_every=2")
    steps = out.split("[engine_smoke] step ")[1:]
    assert len(steps) == 2
    for k in (1, 2):
        for name in (*GRAD_NAMES, "occ_grad_proxy_lambda"):
            key = f"actor/mtp_{k}/{name}:"
            assert key not in steps[0] and key in steps[1], (k, name)
        assert f"actor/mtp_{k}/occ_proxy_lambda" not in out
        used = metric_steps(out, f"actor/mtp_{k}/lambda")
        assert len(used) == 2 and any(x != 0 for x in used[1]), used  # the 2nd update's proxy is informative
        mean_used = sum(used[1]) / len(used[1])  # verl reduces a Metric to its mean per update
        assert metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda") == [[pytest.approx(mean_used, rel=1e-5)]]


def test_diagnostics_with_a_fixed_coefficient_pair_the_proxy_with_the_exact_lambda(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=False", "diagnose_every=2")
    for k in (1, 2):
        fixed = metric_steps(out, f"actor/mtp_{k}/lambda")  # mtp_loss_scaling_factor 0.1 / K, every micro-batch
        assert len(fixed) == 2 and all(x == pytest.approx(0.05) for step in fixed for x in step), fixed
        cross = metric_steps(out, f"actor/mtp_{k}/occ_cross_sum")[1]
        sq = metric_steps(out, f"actor/mtp_{k}/occ_dmtp_sq_sum")[1]
        proxy = [c / (s + 1e-8) for c, s in zip(cross, sq, strict=True)]
        mean_proxy = sum(proxy) / len(proxy)
        assert metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda") == [[pytest.approx(mean_proxy, rel=1e-6)]]
        assert len(metric_steps(out, f"actor/mtp_{k}/occ_grad_lambda")) == 1
