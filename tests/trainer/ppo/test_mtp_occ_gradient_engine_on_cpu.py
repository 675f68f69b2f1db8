"""The gradient estimator inside verl's real Megatron actor (``verl_cpu.engine_smoke``, 2 updates, 2-head MiMo).

* ``occ.estimator=gradient``: every update logs ``actor/mtp_k/occ_grad_*`` and the coefficient the update applied
  (``actor/mtp_k/coef_applied``) is the estimator's ``occ_grad_lambda``; the proxy's lambda of each micro-batch
  is logged beside it (``occ_grad_proxy_lambda``), equal to the ratio of that micro-batch's logged sums.
* ``occ.estimator=proxy`` with ``occ.diagnose_every=2``: the diagnostics appear on the 2nd update only, and the
  coefficient stays the proxy's, which ``occ_grad_proxy_lambda`` reproduces micro-batch by micro-batch.
* a fixed coefficient (``occ.enable=False``) with diagnostics: the coefficient stays the fixed value and
  ``occ_grad_proxy_lambda`` is the proxy of the same micro-batches, from their logged sums.
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
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        "actor_rollout_ref.model.external_lib=verl_mtp_example",
        "actor_rollout_ref.model.trust_remote_code=True",
        *(f"actor_rollout_ref.model.mtp.occ.{o}" for o in occ_overrides),
    )
    assert proc.returncode == 0, out[-4000:]
    assert len(re.findall(r"\[engine_smoke\] step \d+", out)) == 2, out[-2000:]
    return out


def proxy_from_sums(out: str, k: int, update: int, lambda_plus: float = 1.0) -> list[float]:
    cross = metric_steps(out, f"actor/mtp_{k}/occ_cross_sum")[update]
    sq = metric_steps(out, f"actor/mtp_{k}/occ_dmtp_sq_sum")[update]
    return [pytest.approx(lambda_plus * c / (s + 1e-8), rel=1e-5, abs=1e-9) for c, s in zip(cross, sq, strict=True)]


def test_gradient_estimator_sets_the_coefficient_of_every_update(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=True", "estimator=gradient", "lambda_plus_gradient=0.5")
    for k in (1, 2):
        for name in GRAD_NAMES:
            steps = metric_steps(out, f"actor/mtp_{k}/{name}")
            assert len(steps) == 2 and all(len(s) == 1 and math.isfinite(s[0]) for s in steps), (k, name, steps)
        used = metric_steps(out, f"actor/mtp_{k}/coef_applied")
        grad = metric_steps(out, f"actor/mtp_{k}/occ_grad_lambda")
        for u, g in zip(used, grad, strict=True):
            assert all(x == pytest.approx(g[0], rel=1e-5, abs=1e-9) for x in u), (k, used, grad)
        c = metric_steps(out, f"actor/mtp_{k}/occ_grad_c")
        v2 = metric_steps(out, f"actor/mtp_{k}/occ_grad_v2")
        for c_s, v_s, g_s in zip(c, v2, grad, strict=True):
            assert v_s[0] > 0 and g_s[0] == pytest.approx(0.5 * c_s[0] / (v_s[0] + 1e-8), rel=1e-4)
        paired = metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda")
        assert len(paired) == 2
        for update, proxy in enumerate(paired):
            assert proxy == proxy_from_sums(out, k, update)


def test_diagnostics_appear_only_on_every_nth_update_and_keep_the_proxy(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=True", "diagnose_every=2")
    steps = out.split("[engine_smoke] step ")[1:]
    assert len(steps) == 2
    for k in (1, 2):
        for name in (*GRAD_NAMES, "occ_grad_proxy_lambda"):
            key = f"actor/mtp_{k}/{name}:"
            assert key not in steps[0] and key in steps[1], (k, name)
        used = metric_steps(out, f"actor/mtp_{k}/coef_applied")
        assert len(used) == 2 and any(x != 0 for x in used[1]), used  # the 2nd update's proxy is informative
        assert used[1] == proxy_from_sums(out, k, 1)
        assert metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda") == [proxy_from_sums(out, k, 1)]


def test_diagnostics_with_a_fixed_coefficient_pair_the_proxy_with_the_exact_lambda(tiny_mimo_dir):
    out = smoke(tiny_mimo_dir, "enable=False", "diagnose_every=2")
    for k in (1, 2):
        fixed = metric_steps(out, f"actor/mtp_{k}/coef_applied")  # mtp_loss_scaling_factor 0.1 / K, every micro-batch
        assert len(fixed) == 2 and all(x == pytest.approx(0.05) for step in fixed for x in step), fixed
        assert metric_steps(out, f"actor/mtp_{k}/occ_grad_proxy_lambda") == [proxy_from_sums(out, k, 1)]
        assert len(metric_steps(out, f"actor/mtp_{k}/occ_grad_lambda")) == 1
