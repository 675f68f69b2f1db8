"""A verl Megatron checkpoint's Hugging Face weights, MTP layers included, as a model directory to serve.

With ``hf_model`` in ``actor_rollout_ref.actor.checkpoint.save_contents`` (the recipes' setting; also the default
``model`` entry when ``use_dist_checkpointing=False``), verl's ``MegatronCheckpointManager`` writes
``model/huggingface/`` in every checkpoint: the weights through the bridge (mbridge's ``save_weights``, under the
model's own Hugging Face names, MTP layers included while ``mtp.enable=True``), config, tokenizer, generation
config. What a serving engine (vLLM / SGLang, drafting with the MTP layers) needs beyond that is checked and
completed here, without loading a tensor:

* the MTP layers the model's config declares are in the weights, under the names its architecture expects
  (MiMo ``model.mtp_layers.<j>.*``; DeepSeek-V3 / GLM-4.5 ``model.layers.<num_hidden_layers + j>.*``), and with
  ``--base_model`` every tensor name and shape equals the base checkpoint's (a run with ``mtp.enable=False``
  exports no MTP layer and zero ``num_nextn_predict_layers``: refused, not served silently without drafts);
* the shard index lists exactly the tensors of the shard files present;
* the remote-code files ``auto_map`` names (MiMo's ``modeling_mimo.py`` ...) and tokenizer files come from the
  base model when the checkpoint lacks them.

Usage::

    python -m verl_mtp.model_merger --local_dir <ckpts>/global_step_200 --target_dir <out> --base_model <MiMo-7B-RL>
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["MTP_LAYER_PREFIX", "ExportRefused", "ExportSummary", "find_hf_weights", "tensor_shapes",
           "mtp_layer_count", "export", "main"]

INDEX = "model.safetensors.index.json"
MANIFEST = "ckpt_contents.json"  # verl's checkpoint manifest (layout schema v2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def _layer_after_decoder(config: dict, j: int) -> str:
    return f"model.layers.{config['num_hidden_layers'] + j}."


# model_type -> prefix of MTP layer j's tensors in that architecture's own Hugging Face checkpoints
MTP_LAYER_PREFIX: dict[str, Callable[[dict, int], str]] = {
    "mimo": lambda config, j: f"model.mtp_layers.{j}.",
    "deepseek_v3": _layer_after_decoder,
    "glm4_moe": _layer_after_decoder,
}


class ExportRefused(ValueError):
    """The checkpoint cannot be served as it is; the message says why and what to do."""


@dataclass
class ExportSummary:
    source: str
    target: str
    tensors: int
    mtp_layers: dict[str, int]  # prefix -> number of tensors
    copied_from_base: list[str]

    def line(self) -> str:
        mtp = ", ".join(f"{prefix}* ({n} tensors)" for prefix, n in self.mtp_layers.items()) or "none"
        base = f"; from the base model: {', '.join(self.copied_from_base)}" if self.copied_from_base else ""
        return f"{self.tensors} tensors, MTP layers {mtp}{base}: {self.source} -> {self.target}"


def find_hf_weights(local_dir: str) -> str:
    """The Hugging Face directory of a checkpoint: ``global_step_N``, its ``actor/``, or the directory itself."""
    for root in (os.path.join(local_dir, "actor"), local_dir):
        manifest = os.path.join(root, MANIFEST)
        if os.path.isfile(manifest):
            with open(manifest) as f:
                contents = json.load(f).get("contents", {})
            entry = next((contents[k] for k in ("hf_model", "model") if contents.get(k, {}).get("format") ==
                          "huggingface"), None)
            if entry is None:
                raise ExportRefused(
                    f"{root} holds no Hugging Face weights (saved: {sorted(contents)}): it was saved with "
                    "use_dist_checkpointing=True and without hf_model; save with "
                    "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model] (the recipes' "
                    "setting), see docs/cluster.md"
                )
            return os.path.join(root, entry["path"])
        for candidate in (os.path.join(root, "model", "huggingface"), os.path.join(root, "huggingface"), root):
            if glob.glob(os.path.join(candidate, "*.safetensors")):
                return candidate
    raise ExportRefused(f"{local_dir}: neither a verl checkpoint ({MANIFEST}) nor a directory of *.safetensors")


def tensor_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ExportRefused(f"{hf_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def mtp_layer_count(config: dict) -> int:
    """MTP depth as verl reads it (``num_nextn_predict_layers``, or Qwen3.5's ``mtp_num_hidden_layers``)."""
    return int(config.get("num_nextn_predict_layers") or config.get("mtp_num_hidden_layers") or 0)


def _check_index(hf_dir: str, shapes: dict) -> None:
    """The shard index must name exactly the tensors of the shard files present (mbridge writes the base's)."""
    path = os.path.join(hf_dir, INDEX)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    missing_files = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
    unlisted = sorted(set(shapes) - set(weight_map))
    if missing_files or unlisted or set(weight_map) - set(shapes):
        raise ExportRefused(
            f"{hf_dir}/{INDEX} does not match the shards: missing files {missing_files[:3]}, tensors not in the "
            f"index {unlisted[:3]}, indexed tensors absent {sorted(set(weight_map) - set(shapes))[:3]} (an export "
            "interrupted, or one without the MTP layers the base model's index lists)"
        )


def _check_mtp_layers(config: dict, shapes: dict, hf_dir: str) -> dict[str, int]:
    """Tensors per MTP layer under the architecture's names; refuse when a declared layer has none."""
    depth, model_type = mtp_layer_count(config), config.get("model_type")
    if depth == 0 or model_type not in MTP_LAYER_PREFIX:
        return {}
    found = {}
    for j in range(depth):
        prefix = MTP_LAYER_PREFIX[model_type](config, j)
        found[prefix] = sum(1 for name in shapes if name.startswith(prefix))
        if not found[prefix]:
            raise ExportRefused(
                f"{hf_dir}: config.json declares {depth} MTP layer(s) but there is no tensor '{prefix}*' "
                f"(the {model_type} names of MTP layer {j}): export from a run with "
                "actor_rollout_ref.model.mtp.enable=True"
            )
    return found


def _compare_with_base(shapes: dict, config: dict, base_dir: str) -> None:
    """Same tensors, same shapes, same MTP depth as the model the run started from."""
    base_shapes, base_depth = tensor_shapes(base_dir), mtp_layer_count(_read_config(base_dir))
    if mtp_layer_count(config) != base_depth:
        raise ExportRefused(
            f"the checkpoint's config.json declares {mtp_layer_count(config)} MTP layer(s), the base model "
            f"{base_depth}: verl drops the MTP layers of a run with actor_rollout_ref.model.mtp.enable=False, so "
            "its checkpoints cannot serve the drafts; export from a run with mtp.enable=True"
        )
    missing, extra = sorted(set(base_shapes) - set(shapes)), sorted(set(shapes) - set(base_shapes))
    reshaped = sorted(n for n in set(shapes) & set(base_shapes) if shapes[n] != base_shapes[n])
    if missing or extra or reshaped:
        raise ExportRefused(
            f"the checkpoint's tensors differ from the base model's {base_dir}: missing {missing[:3]} "
            f"({len(missing)}), unexpected {extra[:3]} ({len(extra)}), other shapes {reshaped[:3]}"
        )


def _remote_code_files(config: dict) -> list[str]:
    """The ``*.py`` files ``auto_map`` points at (``module.Class`` or ``repo--module.Class``)."""
    refs = []
    for value in config.get("auto_map", {}).values():
        refs += [value] if isinstance(value, str) else [ref for ref in value if ref]
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})


def _complete_from_base(target: str, config: dict, base_dir: Optional[str]) -> list[str]:
    """Copy what the checkpoint lacks and serving needs: remote code, tokenizer and generation files."""
    copied = []
    for name in (*_remote_code_files(config), *TOKENIZER_FILES):
        if os.path.exists(os.path.join(target, name)):
            continue
        if base_dir and os.path.isfile(os.path.join(base_dir, name)):
            shutil.copy2(os.path.join(base_dir, name), os.path.join(target, name))
            copied.append(name)
        elif name in _remote_code_files(config):
            raise ExportRefused(
                f"config.json's auto_map needs {name}, which the checkpoint does not hold: pass --base_model <the "
                "model the run started from> to copy it"
            )
    return copied


def export(local_dir: str, target_dir: str, base_model: Optional[str] = None) -> ExportSummary:
    """Check the checkpoint's Hugging Face weights and write them, completed, to ``target_dir`` (atomically)."""
    source = find_hf_weights(local_dir)
    shapes, config = tensor_shapes(source), _read_config(source)
    if not shapes:
        raise ExportRefused(f"{source} holds no *.safetensors")
    _check_index(source, shapes)
    mtp = _check_mtp_layers(config, shapes, source)
    if base_model:
        _compare_with_base(shapes, config, base_model)
    tmp = target_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    try:
        copied = _complete_from_base(tmp, config, base_model)
    except ExportRefused:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target_dir, ignore_errors=True)
    os.replace(tmp, target_dir)
    return ExportSummary(source, target_dir, len(shapes), mtp, copied)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl_mtp.model_merger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_dir", required=True,
                        help="checkpoint: <trainer.default_local_dir>/global_step_N, its actor/, or a HF directory")
    parser.add_argument("--target_dir", required=True, help="model directory to write (replaced)")
    parser.add_argument("--base_model", default=None,
                        help="the model the run started from: tensor names and shapes are checked against it, and "
                             "remote-code / tokenizer files the checkpoint lacks are copied from it")
    args = parser.parse_args(argv)
    try:
        summary = export(args.local_dir, args.target_dir, args.base_model)
    except ExportRefused as error:
        print(f"verl_mtp.model_merger: REFUSED: {error}", file=sys.stderr)
        return 2
    print(f"verl_mtp.model_merger: {summary.line()}")
    return 0
