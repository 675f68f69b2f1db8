"""Chunked sampled-token log-probs, entropy and sum of squared probabilities against the materialised
log-softmax: values, top-1 and gradients."""

import pytest
import torch

from verl_mtp.models.mcore.token_scores import chunked_token_log_probs, chunked_token_scores

pytestmark = pytest.mark.usefixtures("cpu_megatron")


def reference(hidden, weight, labels, temperature):
    logits = torch.einsum("sbh,vh->sbv", hidden, weight) / temperature[..., None]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return log_probs, logits.argmax(-1)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
@pytest.mark.parametrize("b", [1, 3])
def test_matches_materialised_log_softmax(chunk, b):
    g = torch.Generator().manual_seed(chunk * 10 + b)
    s, h, v = 11, 8, 37
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (s, b), generator=g)
    temperature = 0.5 + torch.rand(s, b, generator=g, dtype=torch.float64)
    upstream = torch.randn(s, b, generator=g, dtype=torch.float64)

    got, got_top1 = chunked_token_log_probs(hidden, weight, labels, temperature, chunk)
    want, want_top1 = reference(hidden, weight, labels, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_top1, want_top1)

    got_gh, got_gw = torch.autograd.grad((got.double() * upstream).sum(), [hidden, weight])
    want_gh, want_gw = torch.autograd.grad((want * upstream).sum(), [hidden, weight])
    torch.testing.assert_close(got_gh, want_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gw, want_gw, rtol=1e-5, atol=1e-6)


def naive_statistics(hidden, weight, temperature):
    """Entropy and sum of squared probabilities of the materialised tempered softmax."""
    log_p = torch.log_softmax(torch.einsum("sbh,vh->sbv", hidden, weight) / temperature[..., None], dim=-1)
    return -(log_p.exp() * log_p).sum(-1), log_p.exp().square().sum(-1)


def random_head(seed: int, s=11, b=2, h=8, v=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (s, b), generator=g)
    return hidden, weight, labels, 0.5 + torch.rand(s, b, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("upstream", ["log_probs_and_entropy", "entropy_only"])
def test_entropy_and_its_gradient_match_the_materialised_softmax(chunk, upstream):
    hidden, weight, labels, temperature = random_head(chunk)
    g = torch.Generator().manual_seed(1)
    w_lp, w_h = (torch.randn(labels.shape, generator=g, dtype=torch.float64) for _ in range(2))
    if upstream == "entropy_only":
        w_lp = w_lp * 0

    got = chunked_token_scores(hidden, weight, labels, temperature, chunk, entropy=True)
    want_lp, _ = reference(hidden, weight, labels, temperature)
    want_h, _ = naive_statistics(hidden, weight, temperature)
    torch.testing.assert_close(got.entropy.double(), want_h, rtol=1e-5, atol=1e-6)
    assert got.sum_pi_squared is None

    got_loss = (got.entropy.double() * w_h).sum() + (
        0 if upstream == "entropy_only" else (got.log_probs.double() * w_lp).sum()
    )
    want_loss = (want_h * w_h).sum() + (want_lp * w_lp).sum()
    for got_g, want_g in zip(torch.autograd.grad(got_loss, [hidden, weight]),
                             torch.autograd.grad(want_loss, [hidden, weight]), strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


def test_sum_pi_squared_matches_the_materialised_softmax_and_is_refused_with_a_gradient():
    hidden, weight, labels, temperature = random_head(3)
    with torch.no_grad():
        got = chunked_token_scores(hidden, weight, labels, temperature, 4, entropy=True, sum_pi_squared=True)
    want_h, want_sq = naive_statistics(hidden, weight, temperature)
    torch.testing.assert_close(got.sum_pi_squared.double(), want_sq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.entropy.double(), want_h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without gradient"):
        chunked_token_scores(hidden, weight, labels, temperature, 4, sum_pi_squared=True)


def test_detached_weight_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(4, 1, 6, requires_grad=True)
    weight = torch.randn(9, 6)
    lp, _ = chunked_token_log_probs(hidden, weight, torch.randint(0, 9, (4, 1)), torch.ones(4, 1), 3)
    lp.sum().backward()
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) > 0
