"""A tiny, deterministic MiMo-style model directory (config, weights, tokenizer) for runs without a hub.

Why: RL with MTP heads needs a model that *has* MTP heads (MiMo-7B, GLM-4.5 ...), and this machine can
neither download one nor afford one. ``make_tiny_mimo`` writes a directory in the HF layout that mbridge
(verl's vanilla Megatron bridge) and verl's ``HFModelConfig`` read: ``model_type: "mimo"``, MTP depth in
``num_nextn_predict_layers`` (the field verl's ``_get_mtp_num_layers`` reads), weights under the exact HF
names mbridge 0.15.1 ``MimoBridge`` maps to Megatron-Core (see :func:`mimo_weight_shapes`).

How the config is read offline: the directory carries its own ``configuration_mimo.py`` (a copy of
:mod:`verl_mtp_example.mimo_config`) referenced by ``auto_map``, so
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works in any process with no import hook (set
``actor_rollout_ref.model.trust_remote_code=True`` in verl, as for the real MiMo-7B). With
``trust_remote_code=False`` call :mod:`verl_mtp_example.register_mimo` first (e.g. through
``actor_rollout_ref.model.external_lib=verl_mtp_example.register_mimo``).

Weight name map (HF name -> Megatron-Core parameter, as mbridge loads them; ``i`` decoder layer, ``j`` MTP
layer; TE spec names, the local spec keeps ``input_layernorm`` / ``pre_mlp_layernorm`` as modules)::

    model.embed_tokens.weight                        embedding.word_embeddings.weight
    model.norm.weight                                decoder.final_layernorm.weight
    lm_head.weight                                   output_layer.weight (absent if tied)
    model.layers.i.input_layernorm.weight            decoder.layers.i.self_attention.linear_qkv.layer_norm_weight
    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}  decoder.layers.i.self_attention.linear_qkv.{weight,bias}
    model.layers.i.self_attn.o_proj.weight           decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight   decoder.layers.i.mlp.linear_fc1.layer_norm_weight
    model.layers.i.mlp.{gate,up}_proj.weight         decoder.layers.i.mlp.linear_fc1.weight (cat gate, up)
    model.layers.i.mlp.down_proj.weight              decoder.layers.i.mlp.linear_fc2.weight
    model.mtp_layers.j.token_layernorm.weight        mtp.layers.j.enorm.weight
    model.mtp_layers.j.hidden_layernorm.weight       mtp.layers.j.hnorm.weight
    model.mtp_layers.j.input_proj.weight [H, 2H]     mtp.layers.j.eh_proj.weight (input = cat(enorm(emb), hnorm(h)))
    model.mtp_layers.j.final_layernorm.weight        mtp.layers.j.final_layernorm.weight
    model.mtp_layers.j.<decoder layer names>         mtp.layers.j.transformer_layer.<decoder layer names>

The weights are random (normal, std ``init_std``; norms 1), a pure function of ``seed`` and the shapes: the
model knows nothing; RL on :mod:`verl_mtp_example.arithmetic_task` has to teach it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "WORDS",
    "make_tiny_mimo",
    "make_tokenizer",
    "tiny_mimo_config",
    "mimo_weight_shapes",
    "tokenizer_vocab",
]

# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
PAD, UNK, BOS, IM_START, IM_END = "<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, IM_START, IM_END)
# Words of the arithmetic prompts and of the chat roles; anything else becomes <unk>.
WORDS = (
    "system", "user", "assistant",
    "What", "is", "Compute", "Answer", "answer", "the", "a", "Give", "only", "number", "result",
    "plus", "minus", "times", "sum", "of", "and", "Solve", "You", "are", "calculator",
)  # fmt: skip
SYMBOLS = tuple("0123456789") + tuple("+-*/=?.,:()") + ("\n", " ")

# Qwen-style turns. The template itself emits BOS (there is no tokenizer post-processor), so prompts built
# by verl's ``apply_chat_template`` start with it; an assistant turn ends with <|im_end|>, which is EOS, so
# generation stops there and ``decode(..., skip_special_tokens=True)`` gives the bare answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# One piece per word, digit, whitespace character or other character; WordLevel maps each piece to an id.
_PIECE_PATTERN = r"[A-Za-z]+|[0-9]|\s|[^A-Za-z0-9\s]"


def tokenizer_vocab() -> dict[str, int]:
    """The fixed vocabulary: special tokens first (pad = 0), then symbols, then words."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + SYMBOLS + WORDS)}


def make_tokenizer(out_dir: str, model_max_length: int = 512):
    """Build the word/character-level tokenizer with the ``tokenizers`` library and save it to ``out_dir``.

    Digits are single tokens (so numbers are spelled digit by digit, which a tiny model can learn), and
    decoding concatenates pieces without separators, so ``decode(encode(s)) == s`` for any text made of
    the vocabulary. Returns the ``PreTrainedTokenizerFast`` (transformers 5 loads it back as
    ``TokenizersBackend`` via ``AutoTokenizer``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=tokenizer_vocab(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def _decoder_layer_shapes(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> dict:
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        f"{prefix}.input_layernorm.weight": (hidden,),
        f"{prefix}.self_attn.q_proj.weight": (q, hidden),
        f"{prefix}.self_attn.q_proj.bias": (q,),
        f"{prefix}.self_attn.k_proj.weight": (kv, hidden),
        f"{prefix}.self_attn.k_proj.bias": (kv,),
        f"{prefix}.self_attn.v_proj.weight": (kv, hidden),
        f"{prefix}.self_attn.v_proj.bias": (kv,),
        f"{prefix}.self_attn.o_proj.weight": (hidden, q),
        f"{prefix}.post_attention_layernorm.weight": (hidden,),
        f"{prefix}.mlp.gate_proj.weight": (ffn, hidden),
        f"{prefix}.mlp.up_proj.weight": (ffn, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, ffn),
    }


def mimo_weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a MiMo checkpoint with its shape, for a config with the Qwen2 fields.

    This is the set mbridge's ``MimoBridge`` asks for (nothing more: extra tensors are harmless to mbridge
    but would hide a naming mistake). The MTP inner layer is a full decoder layer, under
    ``model.mtp_layers.<j>.`` instead of ``model.layers.<i>.``.
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ffn, vocab = config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config.num_hidden_layers):
        shapes.update(_decoder_layer_shapes(f"model.layers.{i}", hidden, heads, kv_heads, head_dim, ffn))
    for j in range(getattr(config, "num_nextn_predict_layers", 0) or 0):
        prefix = f"model.mtp_layers.{j}"
        shapes.update(
            {
                f"{prefix}.token_layernorm.weight": (hidden,),
                f"{prefix}.hidden_layernorm.weight": (hidden,),
                f"{prefix}.input_proj.weight": (hidden, 2 * hidden),
                f"{prefix}.final_layernorm.weight": (hidden,),
            }
        )
        shapes.update(_decoder_layer_shapes(prefix, hidden, heads, kv_heads, head_dim, ffn))
    return shapes


def _init_weights(shapes: dict, seed: int, std: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Norm weights 1, everything else N(0, std), drawn in sorted-name order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensor = torch.ones(shapes[name])
        else:
            tensor = torch.randn(shapes[name], generator=gen) * std
        weights[name] = tensor.to(dtype).contiguous()
    return weights


def tiny_mimo_config(
    num_mtp_layers: int = 1,
    vocab_size: Optional[int] = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
):
    """The :class:`.mimo_config.MiMoConfig` of the tiny model, with the tokenizer's special-token ids.

    ``vocab_size`` defaults to the tokenizer's size rounded up to a multiple of 64 (the embedding may be
    larger than the tokenizer, as in Qwen; it must not be smaller). ``intermediate_size`` defaults to
    ``4 * hidden_size``. GQA is on by default (4 query / 2 KV heads) so the bridge's QKV merge is exercised.
    """
    from verl_mtp_example.mimo_config import MiMoConfig

    if num_mtp_layers < 0:
        raise ValueError(f"num_mtp_layers must be >= 0, got {num_mtp_layers}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
    vocab = tokenizer_vocab()
    config = MiMoConfig(
        vocab_size=vocab_size or -(-len(vocab) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        num_nextn_predict_layers=num_mtp_layers,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[IM_END],
        pad_token_id=vocab[PAD],
        architectures=["MiMoForCausalLM"],
        dtype=dtype,
    )
    # Remote-code hook (see module docstring); only AutoConfig: there is no HF modeling code here.
    config.auto_map = {"AutoConfig": "configuration_mimo.MiMoConfig"}
    return config


def make_tiny_mimo(out_dir: str, num_mtp_layers: int = 1, seed: int = 0, init_std: float = 0.02,
                   dtype: str = "float32", with_tokenizer: bool = True, **architecture) -> str:
    """Write a MiMo-style HF model directory to ``out_dir`` and return its path.

    Files: ``config.json`` (``architectures: ["MiMoForCausalLM"]``, ``model_type: "mimo"``,
    ``num_nextn_predict_layers = num_mtp_layers``, ``auto_map`` -> ``configuration_mimo.py``),
    ``configuration_mimo.py``, ``generation_config.json``, ``model.safetensors`` and, with
    ``with_tokenizer``, the tokenizer files of :func:`make_tokenizer`. ``architecture``: the keyword arguments
    of :func:`tiny_mimo_config`. Same arguments -> byte-identical weights.
    """
    from safetensors.torch import save_file

    from verl_mtp_example import mimo_config

    config = tiny_mimo_config(num_mtp_layers=num_mtp_layers, dtype=dtype, **architecture)
    n_tokens = len(tokenizer_vocab())
    if with_tokenizer and config.vocab_size < n_tokens:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    shutil.copyfile(mimo_config.__file__, os.path.join(out_dir, "configuration_mimo.py"))
    generation = {key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)

    weights = _init_weights(mimo_weight_shapes(config), seed, init_std, getattr(torch, dtype))
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if with_tokenizer:
        make_tokenizer(out_dir, model_max_length=config.max_position_embeddings)
    return out_dir
