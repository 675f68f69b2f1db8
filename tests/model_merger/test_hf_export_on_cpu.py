"""``python -m verl_mtp.model_merger`` turns a verl Megatron checkpoint into a servable Hugging Face directory with
the MTP layers under the model's own names, and the exported model scores exactly like the trained one.

On the tiny MiMo (two MTP layers): Megatron-Core model built and loaded through the bridge verl's engine uses (the
CPU platform's local-spec mbridge), its weights moved away from the initial ones (a stand-in for training), saved
by verl's own ``MegatronCheckpointManager`` with ``save_contents=[model, hf_model]``, exported, loaded again
through the bridge into a fresh model: the main head's and every MTP head's log-probs of a sequence, computed by
hand (``support.mtp_reference``), are equal before and after.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from support.mtp_reference import naive_head_log_probs
from verl_mtp.model_merger.hf_export import main, tensor_shapes

K = 2
CPU_OVERRIDES = dict(use_cpu_initialization=True, masked_softmax_fusion=False, bias_activation_fusion=False,
                     bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
                     persist_layer_norm=False)


@pytest.fixture
def cpu_device(monkeypatch, cpu_megatron):
    """RoPE moves ``inv_freq`` to ``torch.cuda.current_device()`` at the first forward: answer "cpu"."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def _model_config(path: str, mtp: bool):
    from verl.workers.config.model import HFModelConfig, MtpConfig

    return HFModelConfig(path=path, trust_remote_code=True, mtp=MtpConfig(enable=mtp))


def _bridge_model(model_config):
    """The tiny MiMo through the bridge, as verl's engine builds it on the CPU platform (MTP layers iff enabled)."""
    from mbridge.models.mimo import MimoBridge
    from verl.utils.megatron_utils import check_mtp_config
    from verl_cpu.bridges import make_cpu_bridge
    from verl_mtp.models.mcore.mcore_compat import adapt_mbridge_mtp_names

    engine_config = SimpleNamespace(override_transformer_config={})  # what verl's check_mtp_config writes
    check_mtp_config(model_config, engine_config)
    bridge = make_cpu_bridge(MimoBridge)(model_config.hf_config, dtype=torch.float32)
    adapt_mbridge_mtp_names(bridge)
    bridge.set_extra_args(**CPU_OVERRIDES, **engine_config.override_transformer_config)
    model = bridge.get_model(wrap_with_ddp=False, fp16=False, bf16=False)
    bridge.load_weights(model, model_config.local_path)
    return bridge, model


def _save_checkpoint(local_path: str, model_config, bridge, model, contents=("model", "hf_model"), dist=False):
    """verl's own Megatron checkpoint manager, as the actor's engine calls it."""
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager
    from verl.workers.config.checkpoint import McoreCheckpointConfig

    manager = MegatronCheckpointManager(
        config=SimpleNamespace(model=SimpleNamespace(path=model_config.path)),
        checkpoint_config=McoreCheckpointConfig(save_contents=list(contents), load_contents=list(contents)),
        model_config=model_config, transformer_config=bridge.config, role="actor", model=model,
        arch=model_config.architectures[0], hf_config=model_config.hf_config, param_dtype=torch.float32,
        share_embeddings_and_output_weights=False, processing_class=model_config.tokenizer, optimizer=None,
        optimizer_scheduler=None, use_distributed_optimizer=False, use_dist_checkpointing=dist, bridge=bridge,
    )
    manager.save_checkpoint(local_path, global_step=1)


def _head_log_probs(model, seq: torch.Tensor) -> dict[int, torch.Tensor]:
    """Head 0: the main head's log p(x[i+1]); head k: MTP depth k's log p(x[i+k+1]) (computed by hand)."""
    from verl_cpu.testing import forward_bshd

    gpt = model[0]
    gpt.eval()
    with torch.no_grad():
        logits = forward_bshd(gpt, seq[None])[0]
        heads = naive_head_log_probs(gpt, seq, temperature=1.0)
    main_head = torch.log_softmax(logits[:-1], dim=-1).gather(-1, seq[1:, None])[:, 0]
    return {0: main_head, **heads}


@pytest.fixture
def trained_checkpoint(tmp_path, cpu_device):
    """The base tiny MiMo, a "trained" copy saved as verl saves it, and that copy's per-head log-probs."""
    from verl_mtp_example.tiny_model import make_tiny_mimo

    base = make_tiny_mimo(str(tmp_path / "base"), num_mtp_layers=K, seed=3)
    config = _model_config(base, mtp=True)
    bridge, model = _bridge_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter moves, MTP layers included
        for param in model[0].parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    seq = torch.randint(5, 40, (12,), generator=generator)
    before = _head_log_probs(model, seq)
    ckpt = tmp_path / "ckpts" / "global_step_1"
    _save_checkpoint(str(ckpt / "actor"), config, bridge, model)
    return SimpleNamespace(base=base, ckpt=str(ckpt), seq=seq, before=before)


def test_export_reloads_with_equal_per_head_log_probs(trained_checkpoint, tmp_path, capsys):
    from transformers import AutoConfig

    out = str(tmp_path / "served")
    assert main(["--local_dir", trained_checkpoint.ckpt, "--target_dir", out,
                 "--base_model", trained_checkpoint.base]) == 0
    assert "MTP layers model.mtp_layers.0.* (" in capsys.readouterr().out

    # the model's own names and shapes, MTP layers included, and the trained values, not the base's
    shapes, base_shapes = tensor_shapes(out), tensor_shapes(trained_checkpoint.base)
    assert shapes == base_shapes
    assert {n.split(".")[2] for n in shapes if n.startswith("model.mtp_layers.")} == {str(j) for j in range(K)}
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).num_nextn_predict_layers == K
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))

    _, reloaded = _bridge_model(_model_config(out, mtp=True))
    after = _head_log_probs(reloaded, trained_checkpoint.seq)
    _, base_model = _bridge_model(_model_config(trained_checkpoint.base, mtp=True))
    untrained = _head_log_probs(base_model, trained_checkpoint.seq)
    assert sorted(after) == list(range(K + 1))
    for head in range(K + 1):
        torch.testing.assert_close(after[head], trained_checkpoint.before[head], rtol=0, atol=0, msg=f"head {head}")
        assert not torch.allclose(untrained[head], after[head]), head  # the export is the trained model


def test_remote_code_the_checkpoint_lacks_comes_from_the_base(trained_checkpoint, tmp_path):
    base_config = os.path.join(trained_checkpoint.base, "config.json")
    with open(base_config) as f:
        config = json.load(f)
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_mimo.MiMoForCausalLM"  # as MiMo-7B-RL's config
    hf_dir = os.path.join(trained_checkpoint.ckpt, "actor", "model", "huggingface")
    for path in (base_config, os.path.join(hf_dir, "config.json")):
        with open(path, "w") as f:
            json.dump(config, f)
    with open(os.path.join(trained_checkpoint.base, "modeling_mimo.py"), "w") as f:
        f.write("# the model's own modelling code\n")
    out = str(tmp_path / "served")
    assert main(["--local_dir", trained_checkpoint.ckpt, "--target_dir", out]) == 2  # nowhere to take it from
    assert not os.path.exists(out)
    assert main(["--local_dir", trained_checkpoint.ckpt, "--target_dir", out,
                 "--base_model", trained_checkpoint.base]) == 0
    assert os.path.isfile(os.path.join(out, "modeling_mimo.py"))


def test_run_without_mtp_is_refused(tmp_path, cpu_device, capsys):
    """verl drops the MTP layers of a run with mtp.enable=False: its checkpoints cannot draft."""
    from verl_mtp_example.tiny_model import make_tiny_mimo

    base = make_tiny_mimo(str(tmp_path / "base"), num_mtp_layers=1)
    config = _model_config(base, mtp=False)
    bridge, model = _bridge_model(config)
    ckpt = tmp_path / "ckpts" / "global_step_1"
    _save_checkpoint(str(ckpt / "actor"), config, bridge, model)
    assert main(["--local_dir", str(ckpt), "--target_dir", str(tmp_path / "out"), "--base_model", base]) == 2
    err = capsys.readouterr().err
    assert "declares 0 MTP layer(s), the base model 1" in err and "mtp.enable=True" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_hf_weights_is_refused(tmp_path, cpu_device, capsys):
    from verl_mtp_example.tiny_model import make_tiny_mimo

    base = make_tiny_mimo(str(tmp_path / "base"), num_mtp_layers=1)
    config = _model_config(base, mtp=True)
    bridge, model = _bridge_model(config)
    ckpt = tmp_path / "ckpts" / "global_step_1"
    _save_checkpoint(str(ckpt / "actor"), config, bridge, model, contents=("model",), dist=True)
    assert main(["--local_dir", str(ckpt), "--target_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds no Hugging Face weights" in err and "hf_model" in err
