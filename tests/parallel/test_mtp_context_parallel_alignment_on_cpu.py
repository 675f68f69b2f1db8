"""Per-head targets and log-probs across verl's packing: CP = 2 (zig-zag split) and TP = 2 (alignment padding).

On 2 gloo ranks, a micro-batch of packed sequences goes through the product path the engine uses: the main input
ids packed by verl's ``preprocess_thd_engine``, each head's targets gathered by ``head_targets`` from that layout,
a stand-in head whose log-prob at a slot is a fixed function of (token it reads, target it scores), verl's
``postprocess_thd_engine`` (which all-gathers the CP shards back into whole sequences), then
``align_mtp_outputs``. Every rank must get exactly the single-process, unpacked answer: aligned entry ``j`` of
head ``k`` = f(x[j-k], x[j+1]) for ``j >= k``, invalid before. A target taken from the wrong slot, a shift across
a sequence or a CP chunk boundary, or a padding slot leaking in changes the numbers.

Megatron's own MTP block under CP, end to end through the model, is checked against CP = 1 in
test_mtp_context_parallel_rl_on_cpu.py.
"""

import pytest
import torch
from megatron.core import parallel_state as mpu
from verl_cpu.testing import init_cpu_megatron, run_cpu_ranks

import verl  # noqa: F401  (import verl before verl_mtp)
from verl.models.mcore.util import _packed_seq_params_supports, postprocess_thd_engine, preprocess_thd_engine
from verl_mtp.models.mcore.mtp_alignment import align_mtp_outputs, mtp_output_keys
from verl_mtp.models.mcore.mtp_head_labels import head_targets, thd_sequence_ids

pytestmark = pytest.mark.multiprocess

K = 3
LENGTHS = [7, 3, 10, 1, 6, 9]


def sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 40, (n,), generator=g) for n in LENGTHS]


def fake_head(reads: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return -((3 * reads + 5 * scores) % 17).to(torch.float32) / 7


def _rank(info, tp, cp, layout):
    init_cpu_megatron(tp=tp, cp=cp, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    ids = torch.nested.as_nested_tensor(sequences(), layout=torch.jagged)
    packed_ids, params, positions = preprocess_thd_engine(ids, pre_process=True, cp_layout=layout)
    sequence_ids = thd_sequence_ids(params.cu_seqlens_q_padded, positions.shape[-1], cp, mpu.get_context_parallel_rank(), layout)
    outputs = {}
    for k, targets in enumerate(head_targets(ids, sequence_ids[None], positions, K), start=1):
        lp_key, _, top1_key = mtp_output_keys(k)
        outputs[lp_key] = fake_head(packed_ids, targets)
        outputs[top1_key] = (targets % 2).to(torch.float32)
    unpacked = {
        key: postprocess_thd_engine(v, params, ids, len(LENGTHS), cp_layout=layout) for key, v in outputs.items()
    }
    aligned = align_mtp_outputs(unpacked)
    return {key: [t.tolist() for t in v.unbind()] for key, v in aligned.items()}


def expected():
    out = {}
    for k in range(1, K + 1):
        lp_key, valid_key, top1_key = mtp_output_keys(k)
        out[lp_key], out[valid_key], out[top1_key] = [], [], []
        for x in sequences():
            n = len(x)
            nxt = [int(x[j + 1]) if j + 1 < n else 0 for j in range(n)]
            lp = [float(fake_head(x[j - k], torch.tensor(nxt[j]))) if j >= k else 0.0 for j in range(n)]
            out[lp_key].append(lp)
            out[valid_key].append([j >= k for j in range(n)])
            out[top1_key].append([float(nxt[j] % 2) if j >= k else 0.0 for j in range(n)])
    return out


@pytest.mark.parametrize(
    "tp, cp, layout", [(1, 2, "zigzag"), (1, 2, "contiguous"), (2, 1, "zigzag")],
    ids=["cp2-zigzag", "cp2-contiguous", "tp2-padded"],
)
def test_head_alignment_through_verls_packing_equals_unpacked(tp, cp, layout):
    if layout == "contiguous" and not _packed_seq_params_supports("cp_partition_mode"):
        pytest.skip("verl's contiguous CP layout needs megatron-core's PackedSeqParams.cp_partition_mode (0.17+)")
    want = expected()
    for rank, got in enumerate(run_cpu_ranks(_rank, 2, tp, cp, layout)):
        for key, seqs in want.items():
            for i, (g, w) in enumerate(zip(got[key], seqs, strict=True)):
                assert g == pytest.approx(w), (rank, key, i)
