"""The tiny MiMo example's pieces work with the real readers: transformers/verl for config and tokenizer, pandas and
verl's ``RLHFDataset`` for the data, verl's reward loader for ``compute_score``, and mbridge + Megatron-Core
(CPU, world size 1) for the tiny MiMo model with its MTP layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from verl_mtp_example import arithmetic_task
from verl_mtp_example.arithmetic_task import compute_score, make_problem, write_dataset
from verl_mtp_example.tiny_model import (
    IM_END,
    SPECIAL_TOKENS,
    make_tiny_mimo,
    make_tokenizer,
    mimo_weight_shapes,
    tokenizer_vocab,
)


@pytest.fixture(scope="module", params=[1, 2], ids=lambda k: f"mtp{k}")
def tiny_dir(request, tmp_path_factory):
    return make_tiny_mimo(str(tmp_path_factory.mktemp(f"tiny_mimo_k{request.param}")), num_mtp_layers=request.param)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arith"))
    write_dataset(out, n_train=64, n_val=16, seed=3)
    return out


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------
def _load_tokenizer(path):
    from verl.utils import hf_tokenizer  # what verl's HFModelConfig uses

    return hf_tokenizer(path)


def test_tokenizer_round_trips_prompts_answers_and_chat(tmp_path):
    make_tokenizer(str(tmp_path))
    tok = _load_tokenizer(str(tmp_path))
    assert len(tok) == len(tokenizer_vocab())
    assert (tok.pad_token_id, tok.eos_token, tok.bos_token) == (0, IM_END, "<s>")

    texts = [make_problem(a, op, b)[0] for a, op, b in [(3, "+", 5), (12, "-", 30), (7, "*", 8)]]
    texts += ["8", "-18", "Answer: 42.", "You are a calculator.\nGive only the number."]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    assert len(tok.encode("12+7", add_special_tokens=False)) == 4  # one token per digit / symbol

    messages = [{"role": "user", "content": "What is 3+5?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|im_start|>user\nWhat is 3+5?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert tok.decode(ids) == prompt and tok.unk_token_id not in ids
    # A generated answer: digits then EOS; verl's reward managers decode with skip_special_tokens=True.
    answer_ids = tok.encode("8", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(answer_ids, skip_special_tokens=True) == "8"


def test_unknown_text_maps_to_unk(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    assert tok.encode("Zebra", add_special_tokens=False) == [tok.unk_token_id]
    assert tok.encode("\t", add_special_tokens=False) == [tok.unk_token_id]


# --------------------------------------------------------------------------------------------------------
# Model directory: config read offline, weights
# --------------------------------------------------------------------------------------------------------
def test_model_dir_config_and_tokenizer_are_consistent(tiny_dir):
    with open(os.path.join(tiny_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mimo" and cfg["architectures"] == ["MiMoForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_mimo.MiMoConfig"}
    assert os.path.isfile(os.path.join(tiny_dir, "configuration_mimo.py"))
    tok = _load_tokenizer(tiny_dir)
    assert len(tok) <= cfg["vocab_size"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


def test_config_loads_with_trust_remote_code_in_a_fresh_process(tmp_path):
    """What a Ray worker does: no verl_mtp_example import, only the directory's own configuration_mimo.py."""
    tiny_dir = make_tiny_mimo(str(tmp_path / "m"), num_mtp_layers=3, with_tokenizer=False)
    code = (
        "import sys; from transformers import AutoConfig;"
        "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation='flash_attention_2');"
        "print(c.model_type, c.num_nextn_predict_layers, c.rope_theta, type(c).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, tiny_dir], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["mimo", "3", "10000.0", "MiMoConfig"]


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_verl_hf_model_config_reads_mtp_layers(tiny_dir, trust_remote_code):
    from verl.utils.megatron_utils import _get_mtp_num_layers
    from verl.workers.config.model import HFModelConfig, MtpConfig

    import verl_mtp_example.register_mimo  # noqa: F401  (what external_lib does in verl's workers)

    k = json.load(open(os.path.join(tiny_dir, "config.json")))["num_nextn_predict_layers"]
    # trust_remote_code=False works because importing verl_mtp_example.register_mimo registered "mimo".
    model_config = HFModelConfig(path=tiny_dir, trust_remote_code=trust_remote_code, mtp=MtpConfig(enable=True))
    assert model_config.hf_config.model_type == "mimo"
    assert _get_mtp_num_layers(model_config.hf_config) == k
    assert model_config.architectures == ["MiMoForCausalLM"]
    assert model_config.generation_config.eos_token_id == model_config.tokenizer.eos_token_id
    # verl zeroes the MTP depth when MTP is off.
    off = HFModelConfig(path=tiny_dir, trust_remote_code=trust_remote_code)
    assert _get_mtp_num_layers(off.hf_config) == 0


def test_weights_are_complete_and_deterministic(tmp_path):
    from transformers import AutoConfig

    a = make_tiny_mimo(str(tmp_path / "a"), num_mtp_layers=2, seed=1, with_tokenizer=False)
    b = make_tiny_mimo(str(tmp_path / "b"), num_mtp_layers=2, seed=1, with_tokenizer=False)
    c = make_tiny_mimo(str(tmp_path / "c"), num_mtp_layers=2, seed=2, with_tokenizer=False)
    wa, wb, wc = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b, c))
    shapes = mimo_weight_shapes(AutoConfig.from_pretrained(a, trust_remote_code=True))
    assert {n: tuple(t.shape) for n, t in wa.items()} == shapes
    assert "model.mtp_layers.1.input_proj.weight" in shapes and "model.mtp_layers.2.input_proj.weight" not in shapes
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_mimo(str(tmp_path / "d"), vocab_size=8)


# --------------------------------------------------------------------------------------------------------
# Dataset and reward
# --------------------------------------------------------------------------------------------------------
def test_dataset_parquet_has_verl_columns(data_dir):
    import pandas as pd

    train = pd.read_parquet(os.path.join(data_dir, "train.parquet"))
    val = pd.read_parquet(os.path.join(data_dir, "val.parquet"))
    assert (len(train), len(val)) == (64, 16)
    for df in (train, val):
        assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(df.columns)
    row = train.iloc[0]
    assert row["data_source"] == arithmetic_task.DATA_SOURCE
    assert list(row["prompt"]) == [{"role": "user", "content": row["extra_info"]["question"]}]
    assert row["reward_model"]["style"] == "rule"
    info = row["extra_info"]
    assert row["reward_model"]["ground_truth"] == str(info["a"] + info["b"])
    assert train["extra_info"].map(lambda e: e["split"]).eq("train").all()

    again = os.path.join(data_dir, "again")
    write_dataset(again, n_train=64, n_val=16, seed=3)
    assert pd.read_parquet(os.path.join(again, "train.parquet")).equals(train)


def test_verl_rl_dataset_reads_the_parquet_with_the_tiny_tokenizer(data_dir, tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = make_tokenizer(str(tmp_path / "tok"))
    config = OmegaConf.create(
        {
            "max_prompt_length": 32,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    dataset = RLHFDataset(os.path.join(data_dir, "train.parquet"), tokenizer=tok, config=config)
    assert len(dataset) == 64  # nothing filtered: every prompt fits in 32 tokens
    item = dataset[0]
    prompt = tok.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert tok.unk_token_id not in tok.encode(prompt, add_special_tokens=False)


def test_compute_score():
    assert compute_score("local_arithmetic", "8", "8") == 1.0
    assert compute_score("local_arithmetic", " 8\n", "8") == 1.0
    assert compute_score("local_arithmetic", "8<|im_end|>", "8") == 1.0
    assert compute_score("local_arithmetic", "-3", "-3", extra_info={"a": 1}) == 1.0
    assert compute_score("local_arithmetic", "9", "8") == pytest.approx(0.1)
    assert compute_score("local_arithmetic", "9", "8", format_score=0.0) == 0.0
    for bad in ["", "eight", "3+5=8", "8 8", "8.0", "<unk>"]:
        assert compute_score("local_arithmetic", bad, "8") == 0.0, bad
    assert isinstance(compute_score("x", "8", "8", reward_router_address=None), float)


def test_compute_score_loads_through_verl_reward_config():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://verl_mtp_example.arithmetic_task",
                    "name": "compute_score",
                    "reward_kwargs": {"format_score": 0.0},
                }
            }
        }
    )
    fn = get_custom_reward_fn(config)
    kwargs = dict(data_source="local_arithmetic", ground_truth="8", extra_info={})
    assert fn(solution_str="8", **kwargs) == 1.0
    assert fn(solution_str="7", **kwargs) == 0.0  # reward_kwargs reached compute_score


# --------------------------------------------------------------------------------------------------------
# mbridge -> Megatron-Core GPTModel with MTP, on CPU
# --------------------------------------------------------------------------------------------------------
# The bridge verl's engine would use on CPU (vanilla mbridge; Megatron-Bridge, verl's default, is not
# installable next to transformers 5 / megatron-core 0.16.1 on Python 3.11), with the CPU layer spec.
CPU_OVERRIDES = dict(
    use_cpu_initialization=True,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)


@pytest.fixture
def cpu_mimo_bridge_registered():
    """The project's CPU (local-spec) bridges, ``mimo`` included, in mbridge's registry for the test."""
    from verl_cpu.patches import MBRIDGE_BRIDGES, applied

    with applied([MBRIDGE_BRIDGES]):
        yield


def _cpu_mimo_bridge(hf_config, **overrides):
    """Build the bridge the way verl's MegatronEngine._build_tf_config does (vanilla mbridge branch)."""
    from verl.models.mcore.mbridge import AutoBridge

    bridge = AutoBridge.from_config(hf_config, dtype=torch.float32)
    bridge.set_extra_args(**CPU_OVERRIDES, **overrides)
    return bridge


def _assert_bridge_loaded_the_safetensors(model, bridge, tiny_dir, k):
    """Every HF tensor is consumed, nothing else is asked for, and the loaded weights equal the saved ones."""
    from verl_mtp.models.mcore.mcore_compat import mtp_inner_layer

    saved = load_file(os.path.join(tiny_dir, "model.safetensors"))
    state = model.state_dict()
    asked = {h for n in state if "_extra_state" not in n for h in bridge._weight_name_mapping_mcore_to_hf(n)}
    assert asked == set(saved)
    # Loaded weights equal the saved tensors (embedding, decoder, every MTP layer, head).
    pairs = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "output_layer.weight": "lm_head.weight",
        "decoder.layers.1.mlp.linear_fc2.weight": "model.layers.1.mlp.down_proj.weight",
        "decoder.layers.0.self_attention.linear_proj.weight": "model.layers.0.self_attn.o_proj.weight",
    }
    for j in range(k):
        pairs[f"mtp.layers.{j}.eh_proj.weight"] = f"model.mtp_layers.{j}.input_proj.weight"
    for mcore_name, hf_name in pairs.items():
        torch.testing.assert_close(state[mcore_name], saved[hf_name], rtol=0, atol=0, msg=mcore_name)
    for j in range(k):  # the MTP layer's own transformer layer, whatever this megatron-core version names it
        fc2 = mtp_inner_layer(model.mtp.layers[j]).mlp.linear_fc2.weight
        torch.testing.assert_close(fc2, saved[f"model.mtp_layers.{j}.mlp.down_proj.weight"], rtol=0, atol=0)
    fc1 = torch.cat([saved["model.layers.0.mlp.gate_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"]])
    torch.testing.assert_close(state["decoder.layers.0.mlp.linear_fc1.weight"], fc1, rtol=0, atol=0)


@pytest.fixture
def cpu_cuda_device(monkeypatch, cpu_megatron):
    """RoPE moves ``inv_freq`` to ``torch.cuda.current_device()`` at the first forward: answer "cpu"."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def test_mbridge_builds_gptmodel_with_mtp_and_loads_the_weights(tiny_dir, cpu_cuda_device, cpu_mimo_bridge_registered):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
    from verl_cpu.testing import forward_bshd
    from verl.utils.megatron_utils import McoreModuleWrapperConfig, check_mtp_config, make_megatron_module
    from verl.workers.config.model import HFModelConfig, MtpConfig
    from verl_mtp.models.mcore.mcore_compat import adapt_mbridge_mtp_names

    model_config = HFModelConfig(path=tiny_dir, trust_remote_code=True, mtp=MtpConfig(enable=True))
    hf_config = model_config.hf_config
    k = hf_config.num_nextn_predict_layers

    engine_config = SimpleNamespace(override_transformer_config={})  # the field check_mtp_config writes
    check_mtp_config(model_config, engine_config)
    bridge = _cpu_mimo_bridge(hf_config, **engine_config.override_transformer_config)
    adapt_mbridge_mtp_names(bridge)  # what verl-mtp's engine does to verl's bridge (megatron-core >= 0.17)
    assert bridge.config.mtp_num_layers == k and bridge.config.mtp_loss_scaling_factor == 0.1

    tf_config = bridge.config
    tf_config.fp16 = tf_config.bf16 = False
    # verl's MegatronEngine._build_megatron_module, forward-only (no DDP) and vanilla-mbridge branch.
    model_parallel_cuda_manual_seed(0)
    module, _ = make_megatron_module(
        wrap_config=McoreModuleWrapperConfig(wrap_with_ddp=False, use_distributed_optimizer=False),
        tf_config=tf_config,
        hf_config=hf_config,
        bridge=bridge,
    )
    bridge.load_weights(module, model_config.local_path)
    (model,) = module
    assert isinstance(model, GPTModel)
    assert model.config.mtp_num_layers == k and len(model.mtp.layers) == k
    assert all(isinstance(layer, MultiTokenPredictionLayer) for layer in model.mtp.layers)

    _assert_bridge_loaded_the_safetensors(model, bridge, tiny_dir, k)

    # Forward: main-head logits [b, s, vocab]; with labels, the MTP heads run and get gradients.
    tokens = torch.randint(0, len(tokenizer_vocab()), (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = forward_bshd(model, tokens)
    assert logits.shape == (2, 12, hf_config.vocab_size) and torch.isfinite(logits).all()

    model.train()
    loss = forward_bshd(model, tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(2, 12))
    loss.mean().backward()
    for j in range(k):
        assert model.mtp.layers[j].eh_proj.weight.grad.abs().sum() > 0


def test_special_tokens_are_first_and_pad_is_zero():
    vocab = tokenizer_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_project_cpu_bridge_builds_mimo_with_mtp(tmp_path, cpu_cuda_device):
    from mbridge.models.mimo import MimoBridge
    from verl.workers.config.model import HFModelConfig, MtpConfig
    from verl_cpu.bridges import make_cpu_bridge
    from verl_mtp.models.mcore.mcore_compat import adapt_mbridge_mtp_names

    path = make_tiny_mimo(str(tmp_path / "m"), num_mtp_layers=1)
    hf_config = HFModelConfig(path=path, trust_remote_code=True, mtp=MtpConfig(enable=True)).hf_config
    bridge = make_cpu_bridge(MimoBridge)(hf_config, dtype=torch.float32)
    adapt_mbridge_mtp_names(bridge)  # as verl-mtp's engine does before loading (megatron-core >= 0.17 names)
    bridge.set_extra_args(**CPU_OVERRIDES)
    bridge.load_weights(bridge.get_model(wrap_with_ddp=False, fp16=False, bf16=False), path)
