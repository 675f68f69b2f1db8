"""Helpers shared by the multi-process tests and their rank functions (imported in the spawned ranks too).

The model is ``verl_cpu.testing.build_tiny_gpt`` with the ``mtp_loss_type=rl`` patches applied the way the
engine applies them; a forward runs a right-padded BSHD batch through the patched ``GPTModel`` and scores
every head with ``score_mtp_heads`` (the engine's logits processor), plus the main head with verl's
vocab-parallel log-prob. ``scalar_loss`` is a fixed random linear functional of all log-probs, so its
gradient reaches the trunk, every MTP layer and (through the main head, and through the heads when
``train_lm_head``) the output layer.
"""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import torch
from megatron.core import parallel_state
from verl_cpu.testing import build_tiny_gpt, causal_attention_mask

from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits
from verl.utils.megatron_utils import patch_engine_mtp
from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.models.mcore.mtp_log_probs import score_mtp_heads
from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess, patch_postprocess_rl
from verl_mtp.workers.config import MtpRLConfig

from support.mtp_batches import bshd_head_labels

VOCAB = 48
K = 2  # MTP heads
MODEL_SEED = 7  # the single-process reference model
RANK_SEED = MODEL_SEED + 100  # the sharded models' init: nothing matches unless the reference is copied in right
MODEL_KW = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, seq_len=16)


def apply_rl(model, chunk: int, train_lm_head: bool) -> MTPRLPostprocess:
    """What the engine does at start-up for ``mtp_loss_type=rl``: verl's MTP patch, then the MTP-RL
    postprocess (returned)."""
    cfg = MtpRLConfig(
        enable=True, enable_train=True, mtp_loss_type="rl", train_lm_head=train_lm_head, logprob_chunk_size=chunk,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # verl's patch_engine_mtp prints the whole model
        patch_engine_mtp(model, SimpleNamespace(mtp=cfg))
    return patch_postprocess_rl(model, cfg.train_lm_head, cfg.logprob_chunk_size)


def make_batch(lengths=(12, 9, 5), seq: int = 12, seed: int = 0) -> dict:
    """Right-padded batch: ids, the main labels (x[i+1] at slot i), per-token temperature, loss weights."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    ids = torch.zeros(b, seq, dtype=torch.long)
    labels = torch.zeros(b, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, : n - 1] = ids[i, 1:n]
    keys = ["log_probs"] + [mtp_output_keys(k)[0] for k in range(1, K + 1)]
    return {
        "ids": ids,
        "labels": labels,
        "lengths": torch.tensor(lengths),
        "temperature": 0.6 + 0.8 * torch.rand(b, seq, generator=g),
        "weights": {key: torch.randn(b, seq, generator=g) for key in keys},
    }


def forward_stage(model, batch: dict):
    """``GPTModel.forward`` with labels (the RL postprocess runs the heads); logits, or hidden states on a
    non-last pipeline stage."""
    ids = batch["ids"]
    b, s = ids.shape
    position_ids = torch.arange(s).expand(b, s).contiguous()
    return model(ids, position_ids, causal_attention_mask(b, s), labels=batch["labels"])


def score(hook: MTPRLPostprocess, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """Main-head and per-head log-probs / top-1 agreement ``[b, s]`` of the model's last forward."""
    out = hook.pop_output()
    assert out is not None and out.num_heads == K
    scored = score_mtp_heads(out, bshd_head_labels(batch["ids"], batch["lengths"], K), batch["temperature"])
    scored["log_probs"] = vocab_parallel_log_probs_from_logits(
        logits / batch["temperature"].unsqueeze(-1), batch["labels"]
    )
    return scored


def scalar_loss(scored: dict, batch: dict) -> torch.Tensor:
    return sum((w * scored[key]).sum() for key, w in batch["weights"].items())


def detached(scored: dict) -> dict:
    return {k: v.detach().clone() for k, v in scored.items()}


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def grads(model) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def tp_layout(model) -> dict[str, tuple[bool, int]]:
    """Per parameter: (split over TP?, partition dim), from megatron's own parameter attributes."""
    return {
        name: (bool(getattr(p, "tensor_model_parallel", False)), int(getattr(p, "partition_dim", -1)))
        for name, p in model.named_parameters()
    }


def tp_shard(full: torch.Tensor, split: bool, dim: int, rank: int, tp: int) -> torch.Tensor:
    return full.chunk(tp, dim=dim)[rank] if split else full


@torch.no_grad()
def load_tp_shards(model, params: dict[str, torch.Tensor]) -> None:
    """Copy this TP rank's shards of full (TP = 1) parameters in, by megatron's ``tensor_model_parallel`` /
    ``partition_dim`` attributes: column-parallel weights and biases and the vocab-parallel embedding / output
    layer on dim 0, row-parallel weights on dim 1, everything else replicated."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    names = {name for name, _ in model.named_parameters()}
    assert names == set(params), f"parameter names differ: {sorted(names ^ set(params))}"
    for name, p in model.named_parameters():
        assert getattr(p, "partition_stride", 1) == 1, f"{name}: strided partitions are not handled"
        split, dim = bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", -1)
        shard = tp_shard(params[name], split, dim, rank, tp)
        assert shard.shape == p.shape, (name, shard.shape, p.shape)
        p.copy_(shard)


def forward_backward(model, hook: MTPRLPostprocess, batch: dict):
    """Forward through the (last-stage) model, score every head, back-propagate ``scalar_loss``: (logits, scores)."""
    logits = forward_stage(model, batch)
    scored = score(hook, logits, batch)
    scalar_loss(scored, batch).backward()
    return logits, scored


def reference_run(model, hook: MTPRLPostprocess, batch: dict) -> dict:
    """Single-process forward + backward of ``scalar_loss``: scores, main logits and every parameter's grad."""
    model.zero_grad(set_to_none=True)
    logits, scored = forward_backward(model, hook, batch)
    return {"scores": detached(scored), "logits": logits.detach().clone(), "grads": grads(model)}


def rl_setting(cfg: dict) -> tuple[int, bool]:
    """The part of a test configuration the single-process reference depends on: (logprob chunk, train_lm_head)."""
    return cfg["chunk"], cfg["train_lm_head"]


def save_reference_params(tmp_path_factory, name: str) -> str:
    """Build the single-process reference model (``MODEL_SEED``) and save its parameters for the ranks to load."""
    path = tmp_path_factory.mktemp(name) / "reference_params.pt"
    torch.save(full_params(build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW)), path)
    return str(path)


def reference_runs(configs) -> dict:
    """``reference_run`` of the reference model on ``make_batch()``, once per distinct ``rl_setting`` of
    ``configs``: ``{rl_setting: {"scores", "logits", "grads"}}``."""
    batch = make_batch()
    refs = {}
    for cfg in configs:
        key = rl_setting(cfg)
        if key not in refs:
            model = build_tiny_gpt(K, seed=MODEL_SEED, **MODEL_KW)
            refs[key] = reference_run(model, apply_rl(model, *key), batch)
    return refs
