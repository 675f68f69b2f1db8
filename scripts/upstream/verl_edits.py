"""The integration, as anchored edits of verl's own files, derived from the product's code.

* The engine: every method of the product's engine subclass (each one call of ``mtp_engine_hooks`` around
  verl's) goes into verl's ``MegatronEngineWithLMHead``: a method verl's class does not define is added as it is
  (its ``super()`` reaches the same verl method as the subclass's); in a method verl's class defines, the
  calls before the subclass's ``super()`` call open verl's body and the calls after it go before verl's
  final ``return``.
* The config: the regime / OCC fields and methods of the product's ``MtpRLConfig`` join verl's ``MtpConfig``.
* verl's model YAML gains the ``mtp`` keys of the product's Hydra config; ``docs/advance/mtp.md`` a section.

Each edit names the text it expects; when verl's file no longer has it the generator stops with the file and
the anchor, instead of producing a patch that silently misses an integration point.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS_SECTION = HERE / "mtp_rl_docs_section.md"

PRODUCT_ENGINE = "verl_mtp/workers/engine/megatron/transformer_impl.py"
PRODUCT_ENGINE_CLASS = "MegatronMTPEngineWithLMHead"
VERL_ENGINE = "verl/workers/engine/megatron/transformer_impl.py"
VERL_ENGINE_CLASS = "MegatronEngineWithLMHead"
PRODUCT_CONFIG = "verl_mtp/workers/config/mtp.py"
PRODUCT_CONFIG_CLASS = "MtpRLConfig"
VERL_CONFIG = "verl/workers/config/model.py"
VERL_CONFIG_CLASS = "MtpConfig"
HF_MODEL_YAML = "verl/trainer/config/model/hf_model.yaml"


class AnchorError(RuntimeError):
    pass


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise AnchorError(f"{path}: expected exactly one {old!r}, found {text.count(old)} (has verl changed?)")
    path.write_text(text.replace(old, new))


def _class(tree: ast.Module, name: str, path) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    if len(found) != 1:
        raise AnchorError(f"{path}: expected one class {name}, found {len(found)} (has verl changed?)")
    return found[0]


def _methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def _segment(lines: list[str], node: ast.AST) -> list[str]:
    """The node's source lines, decorators included."""
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return lines[start - 1 : node.end_lineno]


def _calls_super(node: ast.stmt, name: str) -> bool:
    return any(
        isinstance(n, ast.Attribute)
        and n.attr == name
        and isinstance(n.value, ast.Call)
        and isinstance(n.value.func, ast.Name)
        and n.value.func.id == "super"
        for n in ast.walk(node)
    )


def _split_around_super(method: ast.FunctionDef, lines: list[str]) -> tuple[list[str], list[str], str | None]:
    """A subclass method's statements before its ``super()`` call and after it (up to ``return X``), and X."""
    body = method.body
    at = next((i for i, stmt in enumerate(body) if _calls_super(stmt, method.name)), None)
    if at is None:
        raise AnchorError(f"{PRODUCT_ENGINE}: {method.name} does not call super().{method.name}")
    pre = [line for stmt in body[:at] for line in _segment(lines, stmt)]
    call = body[at]
    if isinstance(call, ast.Return) and at == len(body) - 1:
        return pre, [], None
    last = body[-1]
    if (
        isinstance(call, ast.Assign)
        and len(call.targets) == 1
        and isinstance(call.targets[0], ast.Name)
        and isinstance(last, ast.Return)
        and isinstance(last.value, ast.Name)
        and last.value.id == call.targets[0].id
    ):
        return pre, [line for stmt in body[at + 1 : -1] for line in _segment(lines, stmt)], call.targets[0].id
    raise AnchorError(
        f"{PRODUCT_ENGINE}: {method.name} must be `pre; return super()...` or `x = super()...; post; return x`"
    )


def _body_start(method: ast.FunctionDef, lines: list[str]) -> int:
    """0-based index of the line after the signature (before any leading comment of the body)."""
    first = method.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno
    index = first.lineno - 1
    while lines[index - 1].strip().startswith("#"):
        index -= 1
    return index


def add_engine_hooks(tree: Path, repo: Path, rewrite) -> None:
    """The product engine subclass's hook calls, placed in verl's ``MegatronEngineWithLMHead``."""
    src_text = (repo / PRODUCT_ENGINE).read_text()
    src_lines = src_text.splitlines(keepends=True)
    src_module = ast.parse(src_text)
    sub = _class(src_module, PRODUCT_ENGINE_CLASS, PRODUCT_ENGINE)
    path = tree / VERL_ENGINE
    lines = path.read_text().splitlines(keepends=True)
    module = ast.parse("".join(lines))
    verl_cls = _class(module, VERL_ENGINE_CLASS, path)
    own = _methods(verl_cls)
    inserts: list[tuple[int, list[str]]] = []  # (0-based line index, lines to insert before it)
    added: list[str] = []
    for name, method in _methods(sub).items():
        if name not in own:
            added += ["\n", *_segment(src_lines, method)]
            continue
        pre, post, result = _split_around_super(method, src_lines)
        target = own[name]
        if pre:
            inserts.append((_body_start(target, lines), pre))
        if post:
            last = target.body[-1]
            if not (isinstance(last, ast.Return) and isinstance(last.value, ast.Name)):
                raise AnchorError(f"{path}: {VERL_ENGINE_CLASS}.{name} does not end with `return <name>`")
            post = [re.sub(rf"\b{result}\b", last.value.id, line) for line in post]
            inserts.append((last.lineno - 1, post))
    first = verl_cls.body[0]
    inserts.append(
        (min([first.lineno, *(d.lineno for d in getattr(first, "decorator_list", []))]) - 1, added[1:] + ["\n"])
    )
    inserts.append((_import_line(module), _product_imports(src_module, src_lines)))
    for index, new in sorted(inserts, key=lambda item: item[0], reverse=True):
        lines[index:index] = [rewrite(line) for line in new]
    path.write_text("".join(lines))


def _product_imports(module: ast.Module, lines: list[str]) -> list[str]:
    """The engine module's imports of the product (the hooks), except the registry swap's."""
    out = []
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "verl_mtp":
            if not node.module.endswith(".registry"):
                out += _segment(lines, node)
    return out


def _import_line(module: ast.Module) -> int:
    """0-based index after verl's last absolute ``from verl... import`` at the top of the module."""
    last = [
        n for n in module.body if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("verl")
    ]
    if not last:
        raise AnchorError(f"{VERL_ENGINE}: no top-level `from verl... import`")
    return last[-1].end_lineno


def _docstring_fields(cls: ast.ClassDef) -> list[str]:
    """The field paragraphs of a class docstring (everything after its first paragraph), 4-space indented."""
    doc = ast.get_docstring(cls, clean=True) or ""
    paragraphs = doc.split("\n\n", 1)
    return [f"    {line}".rstrip() + "\n" for line in paragraphs[1].splitlines()] if len(paragraphs) > 1 else []


def _top_level_names(module: ast.Module) -> dict[str, ast.stmt]:
    """Name -> the statement that binds it at the top of a module (definitions and imports)."""
    names = {}
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return names


def add_mtp_config_fields(tree: Path, repo: Path, rewrite) -> None:
    """The product's ``MtpRLConfig`` body (regime / OCC fields, validation, regime helpers) in verl's
    ``MtpConfig``, with its field documentation and the imports it needs from the moved config module."""
    src_text = (repo / PRODUCT_CONFIG).read_text()
    src_lines = src_text.splitlines(keepends=True)
    src_module = ast.parse(src_text)
    src_cls = _class(src_module, PRODUCT_CONFIG_CLASS, PRODUCT_CONFIG)
    body = src_cls.body[1:] if ast.get_docstring(src_cls) else src_cls.body
    spliced = src_lines[body[0].lineno - 1 : src_cls.end_lineno]
    # verl's model module is not postponed-annotation: the class naming itself in a signature is quoted
    spliced = [re.sub(rf"-> {PRODUCT_CONFIG_CLASS}:", f'-> "{VERL_CONFIG_CLASS}":', line) for line in spliced]

    path = tree / VERL_CONFIG
    lines = path.read_text().splitlines(keepends=True)
    module = ast.parse("".join(lines))
    cls = _class(module, VERL_CONFIG_CLASS, path)
    doc = cls.body[0]
    if not (
        isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and lines[doc.end_lineno - 1].strip() == '"""'
    ):
        raise AnchorError(f"{path}: {VERL_CONFIG_CLASS} has no docstring closing on its own line")
    fields_doc = ["\n", "    MTP-RL parameters (``mtp_loss_type``, ``occ``: see ``verl.workers.config.mtp``):\n"]
    fields_doc += _docstring_fields(src_cls)

    have = _top_level_names(module)
    src_names = _top_level_names(src_module)
    used = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)} - {PRODUCT_CONFIG_CLASS}
    needed = sorted(n for n in used if n not in have and n in src_names)
    from_mtp = [n for n in needed if not isinstance(src_names[n], ast.Import | ast.ImportFrom)]
    imports = [line for n in needed if n not in from_mtp for line in _segment(src_lines, src_names[n])]
    plain = sorted({line for line in imports if line.startswith("import ")})
    relative = ["\n", *sorted(set(imports) - set(plain)), f"from .mtp import {', '.join(from_mtp)}\n"]

    inserts = [
        (cls.end_lineno, ["\n", *spliced]),
        (doc.end_lineno - 1, fields_doc),
        (_last_import(module), relative),
        (_first_import(module), plain),  # the standard library's, before verl's ``from dataclasses import``
    ]
    for index, new in sorted(inserts, key=lambda item: item[0], reverse=True):
        lines[index:index] = [rewrite(line) for line in new]
    path.write_text("".join(lines))


def _last_import(module: ast.Module) -> int:
    return [n for n in module.body if isinstance(n, ast.Import | ast.ImportFrom)][-1].end_lineno


def _first_import(module: ast.Module) -> int:
    return next(n for n in module.body if isinstance(n, ast.Import | ast.ImportFrom)).lineno - 1


def drop_config_class_from_moved_module(tree: Path, config_module: str) -> None:
    """The moved config module keeps the regimes, OCC and checks; its ``MtpRLConfig`` now is verl's
    ``MtpConfig`` (the moved module must not import it back: ``model.py`` imports the moved module)."""
    path = tree / (config_module.replace(".", "/") + ".py")
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    module = ast.parse(text)
    cls = _class(module, VERL_CONFIG_CLASS, path)  # renamed by the layout's rewrite
    start = min([cls.lineno, *(d.lineno for d in cls.decorator_list)])
    del lines[start - 1 : cls.end_lineno]
    text = "".join(lines)
    for old in ("from verl.workers.config import MtpConfig\n", f'    "{VERL_CONFIG_CLASS}",\n'):
        if text.count(old) != 1:
            raise AnchorError(f"{path}: expected exactly one {old!r}")
        text = text.replace(old, "")
    path.write_text(text)


def export_mtp_config(tree: Path) -> None:
    """``verl.workers.config`` exports the regime and OCC config (``OCCConfig``, the regime registry, ...)."""
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
    return [line for line in block if f"_target_: verl_mtp.workers.config.{PRODUCT_CONFIG_CLASS}" not in line]


def add_mtp_yaml_keys(tree: Path, repo_config: Path, rewrite) -> None:
    """verl's model config carries the regime / OCC keys with their defaults (its ``MtpConfig`` has them)."""
    path = tree / HF_MODEL_YAML
    anchor = "  num_speculative_tokens: 1\n"
    keys = rewrite("\n".join(_mtp_keys_yaml(repo_config))).rstrip() + "\n"
    replace_once(path, anchor, anchor + keys)


def add_docs_section(tree: Path) -> None:
    """Append the MTP-RL section to ``docs/advance/mtp.md``; create the file when the tree has no docs
    (verl's source distribution ships none)."""
    path = tree / "docs/advance/mtp.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text().rstrip() + "\n\n" if path.exists() else ""
    path.write_text(before + DOCS_SECTION.read_text())


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


def add_package_data(tree: Path, files: dict) -> None:
    """verl's wheel carries the data files the moved modules read (``package_data`` of verl's ``setup.py``)."""
    placed = [Path(dest) for dest in files.values() if dest.startswith("verl/") and not dest.endswith(".py")]
    patterns = sorted({f"{dest.parent.relative_to('verl').as_posix()}/*{dest.suffix}" for dest in placed})
    anchor = '            "trainer/config/*.yaml",\n'
    replace_once(tree / "setup.py", anchor, anchor + "".join(f'            "{pattern}",\n' for pattern in patterns))


EXAMPLE = "examples/mtp_trainer/run_mimo-7b-rl_dapo_mtp_occ_megatron.sh"
EXAMPLE_RECIPE = "recipe/mtp_rl/run_mimo_7b_rl_dapo.sh"
EXAMPLE_HEADER = """#!/usr/bin/env bash
# MiMo-7B-RL + DAPO on the Megatron backend with its MTP layer trained jointly by the policy loss, the coefficient
# set by Optimal Coefficient Calibration (arXiv 2605.28184, main setting: 16 nodes x 8 GPUs, TP2 / PP2 / CP2).
# Data: python3 -m verl.utils.dataset.prepare_math dapo-math-17k --output ${DATA_HOME}/data/dapo-math-17k.parquet
#       python3 -m verl.utils.dataset.prepare_math aime-2024 --output ${DATA_HOME}/data/aime-2024.parquet
# Baseline: actor_rollout_ref.model.mtp.mtp_loss_type=detach actor_rollout_ref.model.mtp.detach_encoder=True
#           actor_rollout_ref.model.mtp.occ.enable=False.
set -xeuo pipefail

DATA_HOME=${DATA_HOME:-${HOME}/data/mtp_rl}

python3 -m verl.trainer.main_ppo --config-path=config --config-name=ppo_megatron_trainer \\
"""


def _recipe_overrides(repo: Path) -> list[str]:
    """The Hydra overrides the recipe passes to the trainer (its ``python3`` call printed, not run)."""
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "DATA_HOME": "${DATA_HOME}", "PROJECT_NAME": "mtp_rl"}
    printed = subprocess.run(
        ["bash", "-c", f'python3() {{ printf "%s\\n" "$@"; }}; export -f python3; bash {EXAMPLE_RECIPE}'],
        cwd=repo, env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    if printed[:2] != ["-m", "verl_mtp.trainer.main_ppo"]:
        raise AnchorError(f"{EXAMPLE_RECIPE} no longer launches python3 -m verl_mtp.trainer.main_ppo: {printed[:2]}")
    return printed[2:]


def add_example_script(tree: Path, repo: Path) -> None:
    """verl's ``examples/`` gains the recipe's main run as one of its launch scripts (verl's trainer and config)."""
    quoted = [f'"{arg}"' if "${" in arg else shlex.quote(arg) for arg in _recipe_overrides(repo)]
    path = tree / EXAMPLE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXAMPLE_HEADER + "".join(f"    {arg} \\\n" for arg in quoted) + '    "$@"\n')
    path.chmod(0o755)


def _config_edits(tree: Path, repo: Path, layout, files: dict) -> None:
    add_package_data(tree, files)
    add_mtp_config_fields(tree, repo, layout.rewrite)
    drop_config_class_from_moved_module(tree, layout.modules["verl_mtp.workers.config.mtp"])
    export_mtp_config(tree)
    add_mtp_yaml_keys(tree, repo / "verl_mtp/trainer/config/mtp_ppo_megatron_trainer.yaml", layout.rewrite)


# The integration edits by name, as the pull requests of the series (series.py) make them; each takes the tree,
# the repository, the layout and the files the same pull request places.
EDITS = {
    "config": _config_edits,
    "engine": lambda tree, repo, layout, files: add_engine_hooks(tree, repo, layout.rewrite),
    "docs": lambda tree, repo, layout, files: add_docs_section(tree),
    "example": lambda tree, repo, layout, files: add_example_script(tree, repo),
}
