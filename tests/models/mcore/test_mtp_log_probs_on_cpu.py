"""Chunked sampled-token log-probs against the materialised log-softmax: values, top-1 and gradients."""

import pytest
import torch

from verl_mtp.models.mcore.mtp_log_probs import chunked_token_log_probs

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


def test_detached_weight_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(4, 1, 6, requires_grad=True)
    weight = torch.randn(9, 6)
    lp, _ = chunked_token_log_probs(hidden, weight, torch.randint(0, 9, (4, 1)), torch.ones(4, 1), 3)
    lp.sum().backward()
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) > 0
