"""The integration, as anchored edits: of verl's own files, and of the moved engine module.

Each edit names the text it expects; when verl's file no longer has it the generator stops with the file and
the anchor, instead of producing a patch that silently misses an integration point.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS_SECTION = HERE / "mtp_rl_docs_section.md"

ENGINE_CLASS = "class MegatronEngineWithLMHead(MegatronEngine):"
MTP_ENGINE_CLASS = "class MegatronMTPEngineWithLMHead(MegatronEngineWithLMHead):"
HF_MODEL_YAML = "verl/trainer/config/model/hf_model.yaml"
MTP_TARGET = "_target_: verl.workers.config.MtpConfig"


class AnchorError(RuntimeError):
    pass


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise AnchorError(f"{path}: expected exactly one {old!r}, found {text.count(old)} (has verl changed?)")
    path.write_text(text.replace(old, new))


def move_engine_registration(tree: Path, engine_module: str) -> None:
    """verl registers the MTP-RL engine (a subclass, identical without ``mtp_loss_type``) in the slot of
    ``MegatronEngineWithLMHead``: its decorator moves onto the subclass, imported by the megatron package."""
    impl = tree / "verl/workers/engine/megatron/transformer_impl.py"
    match = re.search(r"^(@EngineRegistry\.register\([^\n]*\))\n" + re.escape(ENGINE_CLASS), impl.read_text(), re.M)
    if match is None:
        raise AnchorError(f"{impl}: no @EngineRegistry.register(...) line directly above {ENGINE_CLASS!r}")
    decorator = match.group(1)
    replace_once(impl, f"{decorator}\n{ENGINE_CLASS}", ENGINE_CLASS)

    moved = tree / (engine_module.replace(".", "/") + ".py")
    text = moved.read_text()
    registry_swap = re.search(r"^replace_engine\(MegatronEngineWithLMHead, MegatronMTPEngineWithLMHead\)\n", text, re.M)
    registry_import = re.search(r"^from verl\.workers\.engine\.registry import replace_engine\n", text, re.M)
    if registry_swap is None or registry_import is None:
        raise AnchorError(f"{moved}: the registry swap (replace_engine import and call) was not found")
    text = text.replace(registry_swap.group(0), "").replace(registry_import.group(0), "")
    text = text.replace(
        "from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead\n",
        "from verl.workers.engine.base import EngineRegistry\n"
        "from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead\n",
    )
    moved.write_text(text.rstrip("\n") + "\n")
    replace_once(moved, MTP_ENGINE_CLASS, f"{decorator}\n{MTP_ENGINE_CLASS}")

    init = tree / "verl/workers/engine/megatron/__init__.py"
    anchor = "from .transformer_impl import MegatronEngine, MegatronEngineWithLMHead, MegatronEngineWithValueHead"
    leaf = engine_module.rsplit(".", 1)[1]
    line = f"{anchor}  # noqa: E402\n"
    registers = f"from .{leaf} import MegatronMTPEngineWithLMHead  # noqa: E402, F401  (registers the engine)\n"
    replace_once(init, line, line + registers)


def export_mtp_config(tree: Path) -> None:
    """``verl.workers.config`` exports the regime and OCC config (``MtpRLConfig``, ``OCCConfig``, ...)."""
    init = tree / "verl/workers/config/__init__.py"
    model = "from .model import *  # noqa: F401\n"
    replace_once(init, model, model + "from .mtp import *  # noqa: F401\n")
    replace_once(init, "    + model.__all__\n", "    + model.__all__\n    + mtp.__all__\n")


def _mtp_keys_yaml(repo_config: Path) -> list[str]:
    """The ``actor_rollout_ref.model.mtp`` keys of this repository's Hydra config, at verl's indentation."""
    lines = repo_config.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "mtp:") + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        block.append(line[indent - 2 :] if line.strip() else "")
    return [line for line in block if "_target_: verl_mtp.workers.config.MtpRLConfig" not in line]


def add_mtp_yaml_keys(tree: Path, repo_config: Path, rewrite) -> None:
    """verl's model config builds ``MtpRLConfig`` and carries the regime / OCC keys with their defaults."""
    path = tree / HF_MODEL_YAML
    replace_once(path, MTP_TARGET, "_target_: verl.workers.config.MtpRLConfig")
    anchor = "  num_speculative_tokens: 1\n"
    keys = rewrite("\n".join(_mtp_keys_yaml(repo_config))).rstrip() + "\n"
    replace_once(path, anchor, anchor + keys)


def add_docs_section(tree: Path) -> bool:
    """Append the MTP-RL section to ``docs/advance/mtp.md``; create the file when the tree has no docs
    (verl's source distribution ships none). Returns whether the file existed."""
    path = tree / "docs/advance/mtp.md"
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text().rstrip() + "\n\n" if existed else ""
    path.write_text(before + DOCS_SECTION.read_text())
    return existed


def regenerate_reference_configs(tree: Path, run_python) -> list[str]:
    """Rebuild verl's ``_generated_*.yaml`` as its ``scripts/generate_trainer_config.sh`` does (pre-commit
    ``autogen-trainer-cfg`` checks them): the flattened config printed by ``scripts/print_cfg.py`` with the
    arguments each file's header names, from ``actor_rollout_ref`` on, under the file's own header."""
    regenerated = []
    for path in sorted((tree / "verl/trainer/config").glob("_generated_*.yaml")):
        text = path.read_text()
        match = re.search(r"'python3 scripts/print_cfg\.py --cfg job ?([^']*)'", text)
        if match is None:
            raise AnchorError(f"{path}: header does not name the print_cfg.py arguments")
        printed = run_python(["scripts/print_cfg.py", "--cfg", "job", *match.group(1).split()])
        header, body = (re.search(r"^actor_rollout_ref", t, re.M) for t in (text, printed))
        if header is None or body is None:
            raise AnchorError(f"{path}: no actor_rollout_ref section in the file or in print_cfg.py's output")
        path.write_text(text[: header.start()] + printed[body.start() :])
        regenerated.append(str(path.relative_to(tree)))
    return regenerated


def apply_all(tree: Path, repo: Path, layout) -> dict[str, bool]:
    """Every integration edit; returns which verl files were pre-existing (for the diff report)."""
    engine_module = layout.modules["verl_mtp.workers.engine.megatron.transformer_impl"]
    move_engine_registration(tree, engine_module)
    export_mtp_config(tree)
    add_mtp_yaml_keys(tree, repo / "verl_mtp/trainer/config/mtp_ppo_megatron_trainer.yaml", layout.rewrite)
    docs_existed = add_docs_section(tree)
    return {"docs/advance/mtp.md": docs_existed}
