"""verl_mtp.utils.cpu: CPU platform pieces that need no process group (fast)."""

import math

import pytest
import torch


def test_platform_registered_and_answers_cpu():
    from verl.plugin.platform import PlatformRegistry

    from verl_mtp.utils.cpu.platform import PlatformCPU

    assert PlatformRegistry.get("cpu") is PlatformCPU
    p = PlatformCPU()
    assert p.device_name == "cpu"
    assert p.communication_backend_name() == "gloo"
    assert p.current_device() == "cpu"
    assert not p.is_platform_available(use_smi_check=True)  # never auto-selected
    assert p.device_module.memory_allocated() == 0
    free, total = p.device_module.mem_get_info()
    assert total >= free >= 0


def test_cuda_to_cpu_mode_redirects_literal_cuda():
    from verl_mtp.utils.cpu.device_redirect import CudaToCPUMode, on_cpu

    with CudaToCPUMode():
        a = torch.zeros([], dtype=torch.int, device="cuda")
        b = torch.tensor([1.0], device=torch.device("cuda", 0)).cuda().to("cuda:0")
    assert a.device.type == "cpu" and b.device.type == "cpu"

    @on_cpu
    def gen():
        yield torch.ones(2, device="cuda")

    assert next(gen()).device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # outside the mode CUDA still fails loudly


def _reference_attention(q, k, v, allowed):
    # q,k,v: [b, h, s, d]; allowed: [b|1, 1, s, s]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _attn_module():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from verl_mtp.utils.cpu.attention import CPUCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True, attention_dropout=0.0)
    return CPUCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal).eval()


def test_cpu_core_attention_bshd_padding_mask_matches_reference():
    torch.manual_seed(0)
    m = _attn_module()
    s, b, h, g, d = 5, 2, 4, 2, 4
    q, k, v = torch.randn(s, b, h, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)  # verl [b, s], True = token
    out = m(q, k, v, keep)
    assert out.shape == (s, b, h * d)
    kr, vr = k.repeat_interleave(h // g, 2), v.repeat_interleave(h // g, 2)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    ref = _reference_attention(q.permute(1, 2, 0, 3), kr.permute(1, 2, 0, 3), vr.permute(1, 2, 0, 3), allowed)
    ref = ref.permute(2, 0, 1, 3).reshape(s, b, h * d)
    # real tokens must match; padded rows are only required to be finite
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-5)
    assert torch.allclose(out[:3, 1], ref[:3, 1], atol=1e-5)
    assert torch.isfinite(out).all()


def test_cpu_core_attention_thd_equals_per_sequence_bshd():
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(1)
    m = _attn_module()
    lens, h, g, d = [3, 4], 4, 2, 4
    t = sum(lens)
    q, k, v = torch.randn(t, h, d), torch.randn(t, g, d), torch.randn(t, g, d)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)
    out = m(q, k, v, None, packed_seq_params=psp)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        one = m(q[sl, None], k[sl, None], v[sl, None], None)[:, 0]
        assert torch.allclose(out[sl], one, atol=1e-5)
        start += n
