"""A transformers config class for MiMo-style models (``model_type: "mimo"``), usable offline.

Why: MiMo-7B is a Qwen2 decoder plus ``num_nextn_predict_layers`` MTP layers. transformers 5.10 has no
``mimo`` model type; the real checkpoints ship their config class as remote code, which we cannot download.
verl's ``HFModelConfig`` reads every model config with ``AutoConfig.from_pretrained`` and mbridge picks its
bridge by ``hf_config.model_type``, so the type must stay ``"mimo"`` (a plain ``qwen2`` config would load,
but mbridge would then build a model without MTP layers).

This file is self-contained on purpose (it imports only transformers): ``make_tiny_mimo`` copies it into
the model directory as ``configuration_mimo.py`` and points ``auto_map`` at it, so
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` loads it from the directory itself, in any
process (Ray workers included), exactly like the real MiMo checkpoints. Without ``trust_remote_code``,
register it in the process first (``verl_mtp_example.register_mimo``).
"""

from transformers import Qwen2Config


class MiMoConfig(Qwen2Config):
    """Qwen2 config + ``num_nextn_predict_layers`` (MTP depth), under ``model_type = "mimo"``.

    ``rope_theta`` is exposed as an attribute again: transformers 5 moved it into ``rope_parameters``, but
    mbridge 0.15.1 (``LLMBridge._get_gptmodel_args``) still reads ``hf_config.rope_theta``.
    """

    model_type = "mimo"

    num_nextn_predict_layers: int = 1

    @property
    def rope_theta(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", 10000.0)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        # verl's make_megatron_module assigns hf_config.rope_theta; keep the single source of truth.
        params = dict(self.rope_parameters or {"rope_type": "default"})
        params["rope_theta"] = value
        self.rope_parameters = params


__all__ = ["MiMoConfig"]
