"""The per-head shifts against naive per-sequence loops, over random packings (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_mtp.models.mcore.mtp_alignment import head_labels, positions_in_sequence, shift_packed, shift_right


@st.composite
def packings(draw, max_seqs=6, max_len=12):
    """Sequence lengths 1..max_len packed with optional padding gaps (THD padded and unpadded layouts)."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_seqs))
    gaps = draw(st.lists(st.integers(0, 3), min_size=len(lengths), max_size=len(lengths)))
    starts, cursor = [], 0
    for length, gap in zip(lengths, gaps, strict=True):
        starts.append(cursor)
        cursor += length + gap
    return torch.tensor(starts), torch.tensor(lengths), cursor


def naive_shift(values, starts, lengths, shift, fill):
    out = torch.full_like(values, fill)
    valid = torch.zeros(values.shape[0], dtype=torch.bool)
    for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        for j in range(n):
            src = j - shift
            if 0 <= src < n:
                out[s + j] = values[s + src]
                valid[s + j] = True
    return out, valid


@settings(max_examples=200, deadline=None)
@given(packing=packings(), k=st.integers(1, 3), direction=st.sampled_from([1, -1]))
def test_shift_packed_matches_per_sequence_loop(packing, k, direction):
    starts, lengths, total = packing
    values = torch.randn(total)
    got, got_valid = shift_packed(values, starts, lengths, direction * k, fill=-7.0)
    want, want_valid = naive_shift(values, starts, lengths, direction * k, -7.0)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_valid, want_valid)


@settings(max_examples=100, deadline=None)
@given(packing=packings(), k=st.integers(1, 3))
def test_padding_slots_are_never_valid_nor_sources(packing, k):
    starts, lengths, total = packing
    pos, _ = positions_in_sequence(starts, lengths, total)
    padding = pos < 0
    values = torch.where(padding, torch.tensor(float("nan")), torch.ones(total))
    shifted, valid = shift_packed(values, starts, lengths, k)
    assert not valid[padding].any()
    assert torch.isfinite(shifted).all(), "a padding slot leaked into a sequence"


@settings(max_examples=100, deadline=None)
@given(packing=packings(max_seqs=4), k=st.integers(1, 3))
def test_nested_shift_right_and_head_labels(packing, k):
    _, lengths, _ = packing
    seqs = [torch.randint(0, 50, (n,)) for n in lengths.tolist()]
    ids = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    labels = head_labels(ids, k)
    for seq, lab in zip(seqs, labels.unbind(), strict=True):
        for i in range(len(seq)):
            expected = seq[i + k + 1] if i + k + 1 < len(seq) else 0
            assert lab[i] == expected
    lp = torch.nested.nested_tensor([s.float() for s in seqs], layout=torch.jagged)
    shifted, valid = shift_right(lp, k)
    for seq, sh, va in zip(seqs, shifted.unbind(), valid.unbind(), strict=True):
        for j in range(len(seq)):
            assert bool(va[j]) == (j >= k)
            assert sh[j] == (seq[j - k].float() if j >= k else 0.0)


def test_depth_k_log_prob_lines_up_with_main_head_token():
    """Head k at position i scores x[i+k+1]; after the right shift entry j scores x[j+1], the main head's token."""
    seq = torch.arange(10, 20)
    ids = torch.nested.nested_tensor([seq], layout=torch.jagged)
    for k in (1, 2, 3):
        targets = head_labels(ids, k)
        aligned, valid = shift_right(targets.to(torch.float32), k)
        aligned, valid = aligned.values(), valid.values()
        for j in range(len(seq) - 1):  # main head at j scores x[j+1]
            if valid[j]:
                assert aligned[j] == seq[j + 1]
        assert not valid[:k].any() and valid[k:].all()


def test_shift_is_differentiable_and_routes_gradient_to_sources_only():
    starts, lengths = torch.tensor([0, 5]), torch.tensor([4, 3])
    values = torch.randn(8, requires_grad=True)
    shifted, valid = shift_packed(values, starts, lengths, 1)
    shifted.sum().backward()
    # sources: slots 0,1,2 (seq 0, last slot 3 has no target) and 5,6 (seq 1); slot 4 is padding, 7 is last
    expected = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.float32)
    torch.testing.assert_close(values.grad, expected)
