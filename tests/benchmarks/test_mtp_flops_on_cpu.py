"""The FLOP / memory counter of ``benchmarks.mtp_flops`` against counts done by hand.

The counted step runs the real regime patches, verl's loss and the backward on a fake-tensor Megatron model, so
the hand count below pins both the counter and what each regime computes: every regime's matrix products are
those of ``detach`` (``rl`` adds no trunk work, and the chunked head keeps what its backward needs instead of
recomputing the head's product), with verl's ``use_fused_kernels`` (``*_fused``: the main head scored in chunks)
too.
"""

import pytest
import torch

from benchmarks.mtp_flops import ModelShape, StepCost, _grads_into_main_grad_buffer, count_regimes

pytestmark = pytest.mark.usefixtures("cpu_megatron")

SHAPE = ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, vocab=64, source="test")
SEQ = 24


def hand_count(shape: ModelShape, t: int) -> int:
    """Matrix-product FLOPs of one step: forward 2 per multiply-add, backward twice that (input + weight grad)."""
    h, v, q, kv, f = shape.hidden, shape.vocab, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.ffn
    layer_linear = h * (q + 2 * kv) + q * h + h * 2 * f + f * h  # qkv, proj, gated fc1, fc2
    # torch counts the flash-attention operator for the full square: QK^T and PV forward, 2.5x that backward
    layer_attention = 3.5 * 4 * t * t * q
    layer = 6 * t * layer_linear + layer_attention
    main_head = 6 * t * h * v
    mtp = 6 * t * (2 * h) * h + layer  # eh_proj [2h -> h] and one transformer layer
    mtp_head = 4 * t * h * v  # shared output weight, detached from the MTP loss: forward + input gradient
    return int(shape.layers * layer + main_head + mtp + mtp_head)


def test_every_regime_counts_exactly_the_hand_counted_products():
    regimes = ["detach", "ce", "rl", "rl_occ", "rl_materialised", "detach_fused", "ce_fused", "rl_fused", "rl_occ_fused"]
    costs = count_regimes(SHAPE, SEQ, regimes, chunk=7)
    want = hand_count(SHAPE, SEQ)
    assert {name: cost.flops for name, cost in costs.items()} == dict.fromkeys(costs, want)
    assert costs["rl"].phase_flops.get("chunked_recompute", 0) == 0
    assert costs["rl"].phase_flops["chunked_forward"] == 2 * SEQ * SHAPE.hidden * SHAPE.vocab
    # use_fused_kernels: the main head's products move into the chunked function, none is added
    assert costs["detach_fused"].phase_flops["chunked_forward"] == 2 * SEQ * SHAPE.hidden * SHAPE.vocab
    assert costs["rl_fused"].phase_flops["chunked_forward"] == 2 * 2 * SEQ * SHAPE.hidden * SHAPE.vocab
    assert costs["rl_fused"].phase_flops.get("chunked_recompute", 0) == 0


def test_bytes_and_peak_of_a_known_sequence_of_operators():
    cost = StepCost(fake_mode=None)
    with cost:
        a = torch.ones(1000)  # writes 4000 bytes, live 4000
        b = a * 2  # reads 4000, writes 4000, live 8000
        del a  # live 4000
        c = b.view(10, 100) + 1  # the view moves nothing; the add reads 4000, writes 4000, live 8000
        torch.mul(c, 3, out=c)  # in place through ``out=``: reads 4000, writes 4000
        out = torch.empty(1000)  # an allocation moves nothing; live 12000
        torch.mul(c.view(-1), 2, out=out)  # into a fresh buffer: reads 4000, writes 4000 (not read)
        del b, c, out
    assert cost.bytes == 4000 + 8000 + 8000 + 8000 + 8000
    assert cost.peak == 12000
    assert cost.live == 0


@pytest.mark.parametrize("megatron_ddp", [False, True])
def test_a_parameter_gradient_leaves_the_live_tensors_once_megatron_ddp_would_take_it(megatron_ddp):
    layer = torch.nn.Linear(100, 100, bias=False)  # its gradient: 40000 bytes
    if megatron_ddp:
        _grads_into_main_grad_buffer(layer)
    cost = StepCost(fake_mode=None)
    with cost:
        layer(torch.ones(1, 100)).sum().backward()
    # the gradient counts while it exists; the weight (its transpose is a view) never does
    assert 40000 <= cost.peak < 80000
    assert (layer.weight.grad is None) == megatron_ddp
    assert cost.live == (0 if megatron_ddp else 40000)


def test_the_peaks_vocabulary_sized_part_is_what_was_live_at_the_peak():
    cost = StepCost(fake_mode=None, vocab=10)
    with cost:
        logits = torch.ones(5, 10)  # vocabulary-sized: 200 bytes
        other = torch.ones(100)  # live 600: the peak so far, 200 of it vocabulary-sized
        assert (cost.peak, cost.peak_vocab) == (600, 200)
        del logits
        more = torch.ones(60)  # live 640: a new peak without any vocabulary-sized tensor
        del other, more
    assert (cost.peak, cost.peak_vocab, cost.live_vocab) == (640, 0, 0)
