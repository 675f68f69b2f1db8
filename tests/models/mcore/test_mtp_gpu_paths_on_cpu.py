"""Code paths a GPU run takes by default, run on CPU on a real tiny GPTModel with MTP heads.

bf16 head scoring: the heads' logits come out of the output layer in bf16; the temperature division and the
log-softmax must then run in fp32, as for the main head (Megatron's ``Float16Module`` hands verl fp32 logits),
on both scoring paths. Reference: fp64 log-softmax of the same bf16 logits.
"""

import pytest
import torch
from support.tiny_mcore import build_tiny_gpt

from verl_mtp.models.mcore.mtp_patch import MTPRLOutput, mtp_token_log_probs

pytestmark = pytest.mark.usefixtures("cpu_megatron")

VOCAB = 512
HIDDEN = 64


@pytest.mark.parametrize("chunk", [0, 7], ids=["output_layer", "chunked"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_bf16_head_log_probs_are_computed_in_fp32(chunk, temperature):
    model = build_tiny_gpt(1, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1)
    layer = model.output_layer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    s, b = 24, 2
    hidden = (3 * torch.randn(s, b, HIDDEN, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) / 2)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    temp = torch.full((b, s), temperature)
    out = MTPRLOutput(
        hidden_states=(hidden,), output_layer=layer, output_weight=None, runtime_gather_output=None,
        train_lm_head=False, logprob_chunk_size=chunk,
    )
    got, _ = mtp_token_log_probs(out, hidden, labels, temp, trainable_weight=False)

    logits = (hidden @ layer.weight.detach().t()).double() / temperature  # the layer's bf16 logits, then fp64
    want = torch.log_softmax(logits, dim=-1).gather(-1, labels.t()[..., None]).squeeze(-1).t()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
