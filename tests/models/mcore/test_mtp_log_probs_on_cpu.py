"""The MTP heads' scoring on a real tiny GPTModel: every product a head makes with the vocabulary is one 2-D
matrix product, on both paths (chunked and through the output layer), and a second backward is refused."""

import pytest
import torch
from support.mtp_batches import bshd_head_labels
from support.mtp_reference import apply_regime, main_labels
from torch.utils._python_dispatch import TorchDispatchMode
from verl_cpu.testing import build_tiny_gpt, causal_attention_mask, prepare_mtp_loss_tracker

from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads
from verl_mtp.workers.config import MtpRLConfig

pytestmark = pytest.mark.usefixtures("cpu_megatron")


class VocabProducts(TorchDispatchMode):
    """Every matrix product with the vocabulary as one of its dimensions, by operator name."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.ops = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "matmul", "addmm", "baddbmm") and any(
            isinstance(a, torch.Tensor) and self.vocab in a.shape for a in args
        ):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train_lm_head", [False, True])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("chunk", [0, 4])
def test_every_head_product_with_the_vocabulary_is_one_matrix_product(chunk, b, train_lm_head):
    """Forward and input gradient (one each per chunk of tokens) and a trained lm_head's weight gradient (one,
    over all tokens) of a head: 2-D products, never a batched one, and no product recomputed in the backward.

    Before the materialised path scored a 2-D view, its temperature division laid the logits out with the
    size-1 batch dimension outermost (b = 1, verl's packed micro-batches); with the lm_head frozen (the default)
    torch.matmul could not fold that layout, and the output layer's backward multiplied against ``s`` copies
    of the weight: 2.0-2.6x detach's whole step on the benchmark's shapes.
    """
    vocab, s = 53, 9
    model = build_tiny_gpt(1, vocab_size=vocab, seed=3)
    cfg = MtpRLConfig(
        enable=True, enable_train=True, mtp_loss_type="rl", train_lm_head=train_lm_head, logprob_chunk_size=chunk,
    )
    apply_regime(model, cfg)
    ids = torch.randint(1, vocab, (b, s))
    prepare_mtp_loss_tracker(1)
    model(ids, torch.arange(s).expand(b, s).contiguous(), causal_attention_mask(b, s), labels=main_labels(ids, [s] * b))
    out = model._postprocess.pop_output()
    with VocabProducts(vocab) as products:
        scored = score_mtp_heads(out, bshd_head_labels(ids, [s] * b, 1), torch.full((b, s), 0.7))
        (scored[mtp_output_keys(1)[0]] * torch.rand(b, s)).sum().backward()  # a [b, s] upstream, as verl's loss
    passes = 1 if chunk == 0 else -(-b * s // chunk)  # the chunked path: one per chunk of tokens
    assert products.ops == ["mm"] * (2 * passes + (1 if train_lm_head else 0))


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_second_backward_is_refused_with_the_fix(chunk):
    """Both paths' saved exponentials become the gradient in place, so a second backward would read a gradient."""
    vocab, s = 53, 6
    model = build_tiny_gpt(1, vocab_size=vocab, seed=5)
    apply_regime(model, MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", logprob_chunk_size=chunk))
    ids = torch.randint(1, vocab, (1, s))
    prepare_mtp_loss_tracker(1)
    model(ids, torch.arange(s)[None], causal_attention_mask(1, s), labels=main_labels(ids, [s]))
    scored = score_mtp_heads(model._postprocess.pop_output(), bshd_head_labels(ids, [s], 1), torch.ones(1, s))
    loss = scored[mtp_output_keys(1)[0]].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        loss.backward()
