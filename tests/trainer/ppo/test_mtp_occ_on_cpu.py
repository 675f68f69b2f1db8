"""OCC lambda against an independent token-by-token computation, and its edge cases."""

import math

import pytest
import torch

from verl_mtp.trainer.ppo.mtp_occ import OCCState, calibrated_lambda, occ_statistics
from verl_mtp.workers.config import OCCConfig


def naive_lambda(lp, mtp_lp, old, mask, lambda_plus=1.0, eps=1e-8):
    num = den = 0.0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t]:
                d_rl = float(lp[i, t]) - float(old[i, t])
                d_mtp = float(mtp_lp[i, t]) - float(old[i, t])
                num += d_rl * d_mtp
                den += d_mtp * d_mtp
    return lambda_plus * num / (den + eps)


def occ_lambda(stats, lambda_plus, eps):
    return calibrated_lambda(stats.numerator, stats.denominator, lambda_plus, eps)[0]


def random_inputs(seed, b=4, t=9, empty_rows=1):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 4
    lp = old + 0.1 * torch.randn(b, t, generator=g)
    mtp_lp = old + 0.3 * torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:empty_rows] = False  # padded rows
    return lp, mtp_lp, old, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lambda_plus", [1.0, 0.5])
def test_lambda_is_ratio_of_masked_sums(seed, lambda_plus):
    lp, mtp_lp, old, mask = random_inputs(seed)
    lam = occ_lambda(occ_statistics(lp, mtp_lp, old, mask), lambda_plus, 1e-8)
    assert float(lam) == pytest.approx(naive_lambda(lp, mtp_lp, old, mask, lambda_plus), rel=1e-9, abs=1e-12)


def test_ratio_of_sums_differs_from_mean_of_ratios():
    """Guards against the reference code's per-token-ratio average, which weighs tiny dMTP tokens hugely."""
    lp, mtp_lp, old, mask = random_inputs(0, empty_rows=0)
    lam = float(occ_lambda(occ_statistics(lp, mtp_lp, old, mask), 1.0, 1e-8))
    d_rl, d_mtp = (lp - old)[mask], (mtp_lp - old)[mask]
    mean_of_ratios = float((d_rl * d_mtp / (d_mtp**2 + 1e-8)).mean())
    assert not math.isclose(lam, mean_of_ratios, rel_tol=1e-3)


def test_masked_out_tokens_do_not_count():
    lp, mtp_lp, old, mask = random_inputs(1)
    garbage = lp.clone()
    garbage[~mask] = 1e6
    a = occ_lambda(occ_statistics(lp, mtp_lp, old, mask), 1.0, 1e-8)
    b = occ_lambda(occ_statistics(garbage, mtp_lp, old, mask), 1.0, 1e-8)
    assert float(a) == float(b)


def test_finite_when_dmtp_zero_mask_empty_or_minus_inf():
    lp, mtp_lp, old, mask = random_inputs(2)
    assert float(occ_lambda(occ_statistics(lp, old.clone(), old, mask), 1.0, 1e-8)) == 0.0
    assert float(occ_lambda(occ_statistics(lp, mtp_lp, old, torch.zeros_like(mask)), 1.0, 1e-8)) == 0.0
    mtp_inf = mtp_lp.clone()
    mtp_inf[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = float("-inf")
    lam = occ_lambda(occ_statistics(lp, mtp_inf, old, mask), 1.0, 1e-8)
    assert torch.isfinite(lam)
    nan_lp = lp.clone()
    nan_lp[mask] = float("nan")
    assert torch.isfinite(occ_lambda(occ_statistics(nan_lp, mtp_lp, old, mask), 1.0, 1e-8))


def test_first_minibatch_lambda_is_zero_without_carry():
    _, mtp_lp, old, mask = random_inputs(3)
    state = OCCState(OCCConfig(enable=True))
    lam, informative = state.resolve(1, occ_statistics(old.clone(), mtp_lp, old, mask))
    assert float(lam) == 0.0 and not informative  # flagged: the step's metric leaves this structural 0 out


def test_carry_last_lambda_across_uninformative_micro_batches():
    lp, mtp_lp, old, mask = random_inputs(4)
    state = OCCState(OCCConfig(enable=True, carry_last_lambda=True, initial_lambda=0.05))
    silent = occ_statistics(old.clone(), mtp_lp, old, mask)  # log pi == log pi_old
    lam0, informative0 = state.resolve(1, silent)
    assert float(lam0) == pytest.approx(0.05) and not informative0
    lam1, informative1 = state.resolve(1, occ_statistics(lp, mtp_lp, old, mask))
    assert informative1 and float(lam1) == pytest.approx(naive_lambda(lp, mtp_lp, old, mask))
    lam2, informative2 = state.resolve(1, silent)
    assert not informative2 and float(lam2) == pytest.approx(float(lam1))
    lam_other_head, _ = state.resolve(2, silent)
    assert float(lam_other_head) == pytest.approx(0.05)


def test_max_abs_lambda_bounds_lambda():
    lp, mtp_lp, old, mask = random_inputs(5)
    big = old + 50 * (lp - old)
    state = OCCState(OCCConfig(enable=True, max_abs_lambda=0.5))
    lam, _ = state.resolve(1, occ_statistics(big, mtp_lp, old, mask))
    assert abs(float(lam)) <= 0.5


def test_state_round_trips_for_checkpoints():
    lp, mtp_lp, old, mask = random_inputs(6)
    state = OCCState(OCCConfig(enable=True, carry_last_lambda=True))
    state.resolve(2, occ_statistics(lp, mtp_lp, old, mask))
    restored = OCCState(OCCConfig(enable=True, carry_last_lambda=True))
    restored.load_state_dict(state.state_dict())
    assert restored.state_dict() == state.state_dict() and 2 in restored.last_lambda
    silent = occ_statistics(old.clone(), mtp_lp, old, mask)  # the carried lambda is what resumes
    assert float(restored.resolve(2, silent)[0]) == float(state.resolve(2, silent)[0]) != 0.0
