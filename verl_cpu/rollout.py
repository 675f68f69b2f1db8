"""``hf_cpu``: a CPU rollout for verl's agent loop -- a Ray actor that samples with HF transformers.

Plugs into verl through its rollout extension points (no vLLM/SGLang on CPU), as
:data:`verl_cpu.patches.VERL_ROLLOUT_REPLICA` and :data:`~verl_cpu.patches.VERL_ROLLOUT_ADAPTER` register them:

* ``RolloutReplicaRegistry`` ``"hf_cpu"`` -> :class:`CPURolloutReplica` (what ``AgentLoopManager``
  builds for ``actor_rollout_ref.rollout.name=hf_cpu``); it launches one :class:`CPURolloutServer` Ray actor
  per replica, named like verl's servers (``{prefix}server_{replica}_{node}``);
* ``verl.workers.rollout.base._ROLLOUT_REGISTRY[("hf_cpu", "async")]`` -> :class:`CPUServerAdapter`, the
  object ``ActorRolloutRefWorker`` builds in the hybrid worker; its ``update_weights`` receives verl's
  ``engine.get_per_tensor_param()`` stream (HF names, exported by the Megatron bridge) and pushes the tensors
  into the server -- verl's naive (colocated) weight sync, exactly as with vLLM, minus CUDA IPC.

The server implements the token-in/token-out ``generate(prompt_ids, sampling_params, request_id, ...)`` the
agent loop calls and returns :class:`~verl.workers.rollout.replica.TokenOutput` with the sampled ids and their
log-probs under the temperature-scaled distribution (what verl's actor recomputes). Sampling: temperature,
top-k, top-p, greedy when temperature == 0, stop at EOS or ``max_tokens``. The model is the HF causal LM
(fp32); a MiMo checkpoint (``model_type: mimo``) is served by its Qwen2 trunk. Its MTP layers are not used
for drafting here, but the server holds them and every weight sync replaces them like the trunk's weights, as
a speculative-decoding rollout must (a stale draft silently loses its acceptance rate), so what a sync delivers
can be checked: with ``VERL_CPU_ROLLOUT_WEIGHTS_DIR`` set, the server writes the weights it serves after each
sync to ``<dir>/replica<R>_step<N>.safetensors`` (HF names, trunk and MTP layers; N is the trainer's global
step, 0 for the sync before the first step).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from verl_cpu.environment import ROLLOUT_WEIGHTS_DIR

logger = logging.getLogger(__name__)

MTP_LAYER_KEY = ".mtp_layers."


def _load_hf_causal_lm(local_path: str, trust_remote_code: bool = False):
    """The HF causal LM to sample with, and the checkpoint's MTP-layer weights (``{hf_name: fp32 tensor}``,
    empty for a model without them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(local_path, trust_remote_code=trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(local_path, torch_dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code), {}
    except (ValueError, KeyError):
        if getattr(config, "model_type", None) != "mimo":
            raise
    # MiMo = Qwen2 decoder + MTP layers: serve the trunk with Qwen2ForCausalLM, keep model.mtp_layers.* aside
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    model = Qwen2ForCausalLM(Qwen2Config(**fields)).to(torch.float32)
    from safetensors.torch import load_file
    import glob

    state = {}
    for f in sorted(glob.glob(os.path.join(local_path, "*.safetensors"))):
        state.update(load_file(f))
    mtp = {k: v.to(torch.float32) for k, v in state.items() if MTP_LAYER_KEY in k}
    state = {k: v for k, v in state.items() if MTP_LAYER_KEY not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]:
        raise RuntimeError(f"MiMo trunk load: missing {missing}, unexpected {unexpected}")
    return model, mtp


class CPURolloutServer:
    """The rollout "server": HF model + sampler, one per replica, driven through Ray calls."""

    def __init__(self, config, model_config, rollout_mode, replica_rank: int = 0, **kwargs):
        from omegaconf import DictConfig

        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import RolloutConfig

        torch.set_num_threads(max(1, int(os.environ.get("VERL_CPU_ROLLOUT_THREADS", "1"))))
        if isinstance(config, DictConfig):
            config = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        if isinstance(model_config, DictConfig):
            model_config = omega_conf_to_dataclass(model_config)  # by its _target_ (keeps an extension's config class)
        self.config = config
        self.model_config = model_config
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.model, self.mtp_weights = _load_hf_causal_lm(model_config.local_path,
                                                          getattr(model_config, "trust_remote_code", False))
        self.model.eval()
        self._lock = threading.Lock()
        self._weights_version = 0
        self._global_steps = None
        eos = getattr(model_config, "generation_config", None)
        eos_ids = getattr(eos, "eos_token_id", None) if eos is not None else None
        if eos_ids is None:
            eos_ids = self.model.config.eos_token_id
        self.eos_ids = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))
        tok = getattr(model_config, "tokenizer", None)
        if tok is not None and tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)

    # ---- verl server interface ------------------------------------------------------------------
    def get_server_address(self):
        return ray.util.get_node_ip_address(), 0

    async def generate(self, prompt_ids, sampling_params: dict[str, Any], request_id: str, **kwargs) -> TokenOutput:
        return await asyncio.to_thread(self._generate, list(prompt_ids), dict(sampling_params or {}))

    @torch.no_grad()
    def _generate(self, prompt_ids: list[int], sp: dict[str, Any]) -> TokenOutput:
        max_model_len = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        max_tokens = sp.get("max_tokens") or sp.get("max_new_tokens") or self.config.response_length
        max_tokens = max(0, min(int(max_tokens), max_model_len - len(prompt_ids)))
        temperature = float(sp.get("temperature", 1.0))
        top_k = int(sp.get("top_k", -1) or -1)
        top_p = float(sp.get("top_p", 1.0))
        out_ids, out_lp = [], []
        stop_reason = "length"
        with self._lock:
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            past = None
            for _ in range(max_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                if temperature > 0:
                    logits = logits / temperature
                logp = torch.log_softmax(logits, dim=-1)
                if temperature <= 0:
                    tok = int(torch.argmax(logits))
                else:
                    filt = logits.clone()
                    if 0 < top_k < filt.numel():
                        kth = torch.topk(filt, top_k).values[-1]
                        filt[filt < kth] = float("-inf")
                    if top_p < 1.0:
                        sorted_logits, idx = torch.sort(filt, descending=True)
                        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
                        drop = cum - torch.softmax(sorted_logits, -1) > top_p
                        filt[idx[drop]] = float("-inf")
                    tok = int(torch.multinomial(torch.softmax(filt, -1), 1))
                out_ids.append(tok)
                out_lp.append(float(logp[tok]))
                if tok in self.eos_ids:
                    stop_reason = "completed"
                    break
                ids = torch.tensor([[tok]], dtype=torch.long)
        return TokenOutput(token_ids=out_ids, log_probs=out_lp, stop_reason=stop_reason,
                           extra_fields={"weights_version": self._weights_version})

    def update_weights(self, named_tensors: list, global_steps: Optional[int] = None) -> int:
        """Load ``(hf_name, tensor)`` pairs into the HF model and the held MTP layers. Returns the number of
        tensors loaded; a name the served model does not have is an error (a sync must not drop weights)."""
        params = dict(self.model.named_parameters())
        loaded = 0
        with self._lock, torch.no_grad():
            for name, tensor in named_tensors:
                if name in params:
                    params[name].copy_(tensor.to(params[name].dtype))
                elif name in self.mtp_weights:
                    self.mtp_weights[name] = tensor.detach().to(torch.float32, copy=True)
                else:
                    raise KeyError(f"hf_cpu rollout: unknown weight {name}")
                loaded += 1
            if getattr(self.model.config, "tie_word_embeddings", False):
                self.model.tie_weights()
            self._weights_version += 1
            self._global_steps = global_steps
            if os.environ.get(ROLLOUT_WEIGHTS_DIR):
                self._write_served_weights(os.environ[ROLLOUT_WEIGHTS_DIR], global_steps)
        return loaded

    def served_weights(self) -> dict[str, torch.Tensor]:
        """Every weight the server holds, by HF name: the sampling model's parameters and the MTP layers."""
        weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        weights.update({name: t.clone() for name, t in self.mtp_weights.items()})
        return weights

    def _write_served_weights(self, directory: str, global_steps: Optional[int]) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"replica{self.replica_rank}_step{global_steps}.safetensors")
        save_file(self.served_weights(), path + ".tmp")
        os.replace(path + ".tmp", path)

    # lifecycle no-ops (nothing to free on CPU)
    async def wake_up(self, *args, **kwargs):
        return None

    async def sleep(self, *args, **kwargs):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, *args, **kwargs):
        return {}

    async def resume_generation(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    async def set_global_steps(self, global_steps: int):
        self._global_steps = global_steps


def _server_name(replica_rank: int, node_rank: int = 0, kind: str = "") -> str:
    return f"hf_cpu_server{kind}_{replica_rank}_{node_rank}"


class CPURolloutReplica(RolloutReplica):
    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self):
        kind = "_reward" if self.is_reward_model else ("_teacher" if self.is_teacher_model else "")
        name = _server_name(self.replica_rank, 0, kind) + self.name_suffix
        server_cls = ray.remote(CPURolloutServer)
        server = server_cls.options(
            name=name, num_cpus=0, max_concurrency=self.max_concurrency,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                      if k.startswith("VERL_") or k in ("PYTHONPATH",)}},
        ).remote(config=self.config, model_config=self.model_config, rollout_mode=self.rollout_mode,
                 replica_rank=self.replica_rank)
        self.servers = [server]
        address, port = await server.get_server_address.remote()
        self._server_handle = server
        self._server_address = f"{address}:{port}"


class CPUServerAdapter(BaseRollout):
    """Client side in the hybrid trainer worker: forwards verl's weight sync to the CPU server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size * \
            self.config.pipeline_model_parallel_size
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self._has_server = rank % world == 0
        self.server_handle = None

    def _server(self):
        if not self._has_server:
            return None
        if self.server_handle is None:
            self.server_handle = ray.get_actor(_server_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf_cpu rollout: wire_format {wire_format}")
        named = []
        if hasattr(weights, "__aiter__"):
            async for name, tensor in weights:
                named.append((name, tensor.detach().to("cpu", copy=True)))
        else:
            for name, tensor in weights:
                named.append((name, tensor.detach().to("cpu", copy=True)))
        server = self._server()
        if server is not None:
            await server.update_weights.remote(named, global_steps)
