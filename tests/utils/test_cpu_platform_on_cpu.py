"""verl_cpu: CPU platform pieces that need no process group (fast), and the engine lookup in a fresh process."""

import math

import pytest
import torch


def test_platform_registered_and_answers_cpu():
    from verl.plugin.platform import PlatformRegistry

    from verl_cpu.patches import VERL_PLATFORM, applied
    from verl_cpu.platform import PlatformCPU

    with applied([VERL_PLATFORM]):
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
    from verl_cpu.cuda import CudaToCPUMode, on_cpu

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

    from verl_cpu.attention import CPUCoreAttention

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


def test_cpu_process_env_puts_the_plugin_first_and_keeps_user_settings(monkeypatch):
    from verl_cpu.environment import PLUGIN, cpu_process_env

    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", f"some.ext,{PLUGIN},other.ext")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = cpu_process_env()
    assert env["VERL_PLATFORM"] == "cpu"
    assert env["VERL_USE_EXTERNAL_MODULES"] == f"{PLUGIN},some.ext,other.ext"
    assert env["OMP_NUM_THREADS"] == "4" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "RANK" not in env and "MASTER_PORT" not in env
    one = cpu_process_env(one_rank=True)
    assert (one["RANK"], one["WORLD_SIZE"], one["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(one["MASTER_PORT"]) < 65536
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert cpu_process_env(one_rank=True)["MASTER_PORT"] == "29555"


def test_cpu_child_env_drops_megatron_attention_exports_of_the_parent(monkeypatch):
    """A model built here with attention_backend=flash exports NVTE_FLASH_ATTN=1; a CPU child (local backend)
    inheriting it fails Megatron's backend assertion, as CI's e2e tests did after an in-process benchmark build."""
    from verl_cpu.environment import MEGATRON_ATTENTION_ENV, cpu_child_env

    for key in MEGATRON_ATTENTION_ENV:
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("SOME_USER_SETTING", "kept")
    env = cpu_child_env()
    assert not set(MEGATRON_ATTENTION_ENV) & set(env)
    assert env["SOME_USER_SETTING"] == "kept" and env["VERL_PLATFORM"] == "cpu"


def test_megatron_cpu_config_group_composes_at_the_engine_node():
    import yaml
    from hydra import compose, initialize_config_module
    from importlib.resources import files
    from omegaconf import OmegaConf

    group = yaml.safe_load(files("verl_cpu.config").joinpath("cpu_engine/megatron.yaml").read_text())
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_megatron_trainer", overrides=[
            "hydra.searchpath=[pkg://verl.trainer.config,pkg://verl_cpu.config]",
            "+cpu_engine@actor_rollout_ref.actor.megatron=megatron",
            "actor_rollout_ref.actor.megatron.override_transformer_config.persist_layer_norm=True",  # still wins
        ])
    megatron = OmegaConf.to_container(cfg.actor_rollout_ref.actor.megatron, resolve=True)
    group["override_transformer_config"]["persist_layer_norm"] = True
    for key, value in group.items():
        if isinstance(value, dict):
            assert {k: megatron[key][k] for k in value} == value, key
        else:
            assert megatron[key] == value, key
    assert "attention_backend" not in cfg.actor_rollout_ref.model  # nothing lands outside the chosen node


_LOOKUP_AFTER_A_LATER_REGISTRATION = """
import json
import verl
import verl.workers.engine
from verl.workers.engine.base import EngineRegistry

slots = EngineRegistry._engines["language_model"]["megatron"]
cuda_before = slots["cuda"]
cpu_before = EngineRegistry.get_engine_cls("language_model", "megatron")

class ExtensionEngine(cuda_before):  # an extension that swaps itself in after the CPU platform loaded
    pass

slots["cuda"] = ExtensionEngine
cpu_after = EngineRegistry.get_engine_cls("language_model", "megatron")
print(json.dumps({
    "before": [c.__name__ for c in cpu_before.__bases__], "cuda_before": cuda_before.__name__,
    "after": [c.__name__ for c in cpu_after.__bases__],
    "same_class_again": EngineRegistry.get_engine_cls("language_model", "megatron") is cpu_after,
}))
"""


def test_cpu_engine_is_the_cpu_variant_of_the_cuda_engine_at_lookup_time():
    """verl on CPU builds the CPU variant of whatever engine holds the cuda slot when verl looks it up."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "verl_cpu.plugin"}
    proc = subprocess.run([sys.executable, "-c", _LOOKUP_AFTER_A_LATER_REGISTRATION], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["before"] == ["CPUMegatronEngineMixin", got["cuda_before"]]
    assert got["after"] == ["CPUMegatronEngineMixin", "ExtensionEngine"]
    assert got["same_class_again"]


def test_platform_imports_neither_the_product_nor_the_example():
    """verl_cpu depends on verl / Megatron-Core / torch only (read from its source with ``ast``)."""
    import ast
    from pathlib import Path

    import verl_cpu

    offending = []
    for path in Path(verl_cpu.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offending += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("verl_mtp", "verl_mtp_example")]
    assert not offending
