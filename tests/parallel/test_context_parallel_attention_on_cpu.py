"""CP = 2 on 2 gloo CPU ranks: the CPU platform's context-parallel attention, and the MTP roll it enables.

Attention (``verl_cpu.context_parallel_attention``): each rank holds chunks ``r`` and ``3 - r`` of every
sequence (zig-zag, sequences padded to a multiple of 4, split here by hand from the global tensors). Its outputs
and the gradients of its own queries / keys / values (a fixed random linear loss on both ranks' outputs) must
equal a naive per-sequence softmax attention over the unpadded sequences (1e-5), for packed THD with 3 sequences
and for BSHD with a padding mask, both with grouped keys / values. Key / value gradients only come out right if
the all-gather's backward hands every rank the gradient its keys got on *both* ranks.

MTP roll (Megatron-Core's ``roll_tensor``, which ``MultiTokenPredictionBlock`` applies to its input ids): with
verl's packing (padded offsets as ``cu_seqlens_q``) every token ``i`` of every sequence receives ``x[i+1]``
after the CP exchange. With Megatron's own convention (unpadded ``cu_seqlens_q``, the Megatron-LM #4495 / #6205
bug class) the same call puts wrong tokens in place, and the product's ``check_cp_roll_offsets`` refuses those
offsets.
"""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.multi_token_prediction import roll_tensor
from verl_cpu.context_parallel_attention import context_parallel_attention
from verl_cpu.testing import init_cpu_megatron, run_cpu_ranks

from verl.models.mcore.util import postprocess_thd_engine, preprocess_thd_engine
from verl_mtp.models.mcore.mtp_patch import check_cp_roll_offsets

pytestmark = pytest.mark.multiprocess

CP = 2
HEADS, GROUPS, DIM = 4, 2, 8
THD_LENGTHS = [5, 8, 3]
BSHD_LENGTHS, BSHD_SEQ = [8, 5, 2], 8
ROLL_LENGTHS = [7, 11, 9, 7]


def padded(n: int) -> int:
    return -(-n // (2 * CP)) * 2 * CP


def zigzag_rows(length: int, rank: int) -> torch.Tensor:
    """Global rows a rank holds of one sequence padded to ``length`` (naive: chunk r and chunk 2*CP-1-r)."""
    chunks = torch.arange(length).chunk(2 * CP)
    return torch.cat([chunks[rank], chunks[2 * CP - 1 - rank]])


def naive_attention(q, k, v, keep=None):
    """Causal softmax attention of one sequence ``[s, heads, d]`` with grouped k / v ``[s, groups, d]``."""
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / DIM**0.5
    s = q.shape[0]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if keep is not None:
        allowed = allowed & keep[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def thd_inputs():
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in THD_LENGTHS:
        seqs.append({name: torch.randn(padded(n), h, DIM, generator=g) for name, h in
                     (("q", HEADS), ("k", GROUPS), ("v", GROUPS), ("w", HEADS))})
    return seqs


def bshd_inputs():
    g = torch.Generator().manual_seed(2)
    b = len(BSHD_LENGTHS)
    out = {name: torch.randn(BSHD_SEQ, b, h, DIM, generator=g) for name, h in
           (("q", HEADS), ("k", GROUPS), ("v", GROUPS), ("w", HEADS))}
    out["keep"] = torch.arange(BSHD_SEQ)[None, :] < torch.tensor(BSHD_LENGTHS)[:, None]  # [b, s]
    return out


def naive_thd():
    """Per sequence: outputs and q/k/v gradients of the real rows, from the unpadded sequence."""
    results = []
    for n, x in zip(THD_LENGTHS, thd_inputs(), strict=True):
        q, k, v = (x[name][:n].clone().requires_grad_() for name in "qkv")
        out = naive_attention(q, k, v)
        (out * x["w"][:n]).sum().backward()
        results.append({"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad})
    return results


def naive_bshd():
    x = bshd_inputs()
    results = []
    for i, n in enumerate(BSHD_LENGTHS):
        q, k, v = (x[name][:, i].clone().requires_grad_() for name in "qkv")
        out = naive_attention(q, k, v, keep=x["keep"][i])
        (out[:n] * x["w"][:n, i]).sum().backward()
        results.append({"out": out.detach()[:n], "q": q.grad[:n], "k": k.grad[:n], "v": v.grad[:n]})
    return results


def _thd_rank(rank: int, group):
    seqs = thd_inputs()
    rows = [zigzag_rows(padded(n), rank) for n in THD_LENGTHS]
    local = {name: torch.cat([x[name][r] for x, r in zip(seqs, rows, strict=True)]).requires_grad_(name in "qkv")
             for name in "qkvw"}
    cu = torch.tensor([0] + [padded(n) for n in THD_LENGTHS]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=int(cu.diff().max()),
                             max_seqlen_kv=int(cu.diff().max()))
    out = context_parallel_attention(local["q"], local["k"], local["v"], None, params, group,
                                     causal=True, scale=DIM**-0.5, dropout_p=0.0)
    real = torch.cat([r < n for n, r in zip(THD_LENGTHS, rows, strict=True)])
    local_w = local["w"] * real[:, None, None]  # padded query rows do not enter the loss
    (out.view_as(local_w) * local_w).sum().backward()
    return {"rows": rows, "out": out.detach().view_as(local["w"]),
            **{name: local[name].grad for name in "qkv"}}


def _bshd_rank(rank: int, group):
    x = bshd_inputs()
    rows = zigzag_rows(BSHD_SEQ, rank)
    local = {name: x[name][rows].clone().requires_grad_(name in "qkv") for name in "qkvw"}
    local_w = local["w"] * x["keep"].t()[rows][:, :, None, None]  # padded query rows do not enter the loss
    out = context_parallel_attention(local["q"], local["k"], local["v"], x["keep"][:, rows], None, group,
                                     causal=True, scale=DIM**-0.5, dropout_p=0.0)
    (out.view_as(local_w) * local_w).sum().backward()
    return {"rows": rows, "out": out.detach().view_as(local_w), **{name: local[name].grad for name in "qkv"}}


def _roll(ids, params, group):
    """``roll_tensor`` as the MTP block applies it to the packed ``[1, t]`` input ids."""
    rolled, _ = roll_tensor(ids, shifts=-1, dims=-1, cp_group=group, packed_seq_params=params)
    return rolled


def _roll_rank(group):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 50, (n,), generator=g) for n in ROLL_LENGTHS]
    nested = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
    ids, params, _ = preprocess_thd_engine(nested, pre_process=True)
    verl_rolled = postprocess_thd_engine(_roll(ids, params, group), params, nested, len(seqs))
    unpadded = torch.tensor([0] + ROLL_LENGTHS).cumsum(0).to(torch.int32)
    megatron_params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=unpadded, cu_seqlens_kv=unpadded,
        cu_seqlens_q_padded=params.cu_seqlens_q_padded, cu_seqlens_kv_padded=params.cu_seqlens_kv_padded,
        max_seqlen_q=params.max_seqlen_q, max_seqlen_kv=params.max_seqlen_kv,
    )
    megatron_rolled = postprocess_thd_engine(_roll(ids, megatron_params, group), params, nested, len(seqs))
    refused = []
    for p in (params, megatron_params):
        try:
            check_cp_roll_offsets(p, CP)
            refused.append(None)
        except ValueError as e:
            refused.append(str(e))
    return {"seqs": seqs, "verl": [t.reshape(-1) for t in verl_rolled.unbind()],
            "megatron": [t.reshape(-1) for t in megatron_rolled.unbind()], "refused": refused}


def _rank(info):
    init_cpu_megatron(cp=CP, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    group = parallel_state.get_context_parallel_group()
    rank = parallel_state.get_context_parallel_rank()
    return {"thd": _thd_rank(rank, group), "bshd": _bshd_rank(rank, group), "roll": _roll_rank(group)}


@pytest.fixture(scope="module")
def ranks():
    return run_cpu_ranks(_rank, CP, timeout_s=900)


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_thd_attention_and_its_gradients_equal_naive_per_sequence(ranks):
    want = naive_thd()
    for rank, r in enumerate(ranks):
        start = 0
        for i, (n, rows) in enumerate(zip(THD_LENGTHS, r["thd"]["rows"], strict=True)):
            span = slice(start, start + len(rows))
            start += len(rows)
            real = rows < n  # rows past the sequence's length are CP padding
            for name in ("out", "q", "k", "v"):
                _assert_close(r["thd"][name][span][real], want[i][name][rows[real]], f"rank {rank} seq {i} {name}")
        assert start == r["thd"]["out"].shape[0]


def test_bshd_attention_with_padding_mask_and_its_gradients_equal_naive(ranks):
    want = naive_bshd()
    for rank, r in enumerate(ranks):
        rows = r["bshd"]["rows"]
        for i, n in enumerate(BSHD_LENGTHS):
            real = rows < n
            for name in ("out", "q", "k", "v"):
                _assert_close(r["bshd"][name][real, i], want[i][name][rows[real]], f"rank {rank} row {i} {name}")


def test_mtp_roll_under_cp_with_verls_padded_offsets_gives_next_tokens(ranks):
    for r in ranks:
        roll = r["roll"]
        for x, got in zip(roll["seqs"], roll["verl"], strict=True):
            assert torch.equal(got[:-1], x[1:])
        assert roll["refused"][0] is None


def test_unpadded_offsets_corrupt_megatrons_cp_roll_and_are_refused(ranks):
    for r in ranks:
        roll = r["roll"]
        wrong = [not torch.equal(got[:-1], x[1:]) for x, got in zip(roll["seqs"], roll["megatron"], strict=True)]
        assert any(wrong), "Megatron's roll with unpadded cu_seqlens_q was expected to misplace tokens"
        assert "cu_seqlens_q differs from cu_seqlens_q_padded" in roll["refused"][1]
