"""The CPU platform's patches of third-party code: all in ``verl_cpu.patches``, each applied and undone.

* In a fresh interpreter (nothing applied yet, no ``VERL_PLATFORM``): every patch changes what it says, and after
  ``undo`` torch.cuda, torch.Tensor, Megatron-Core, verl and mbridge are as they were -- every module attribute,
  class attribute, module- and class-level dict entry and function default of those packages, compared by
  identity.
* Read from the source: no other module of ``verl_cpu`` assigns to a third-party module or class, writes into a
  third-party registry or walks ``sys.modules``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import verl_cpu
from verl_cpu import patches

_ROUND_TRIP = r"""
import json, sys, types

import verl  # verl's own entry-point plugins (verl-mtp's engine) load first: they are part of "as it was"
from verl_cpu import patches

ALL = [value for value in vars(patches).values() if isinstance(value, patches.Patch)]
ALL.append(patches.tensor_host_reads(lambda name, original: lambda *args, **kwargs: original(*args, **kwargs)))
# import everything applying imports, so that the snapshots differ only where a patch writes
for module in ("verl_cpu.device_module", "verl_cpu.cuda", "verl_cpu.platform", "verl_cpu.engine", "verl_cpu.bridges",
               "verl_cpu.testing.tiny_gpt", "verl_cpu.rollout", "verl.utils.device"):
    __import__(module)
for patch in ALL:
    for module in patch.requires:
        __import__(module)
    patches.resolve(patch.target)

PACKAGES = ("torch.cuda", "megatron", "verl", "mbridge")  # and the module torch itself (torch.Tensor)


def _entries(prefix, namespace, state):
    for name, value in list(namespace.items()):
        state[prefix + (name,)] = id(value)
        if isinstance(value, dict):
            state[prefix + (name, "items")] = sorted((repr(k), id(v)) for k, v in value.items())
        if isinstance(value, types.FunctionType):
            state[prefix + (name, "__defaults__")] = tuple(id(d) for d in value.__defaults__ or ())


def snapshot():
    state = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torch" or any(name == p or name.startswith(p + ".") for p in PACKAGES)):
            continue
        _entries((name,), vars(module), state)
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == name:
                _entries((name, attr), dict(vars(value)), state)
    return state


def changed(before, after):
    return sorted(repr(key) for key in before.keys() | after.keys() if before.get(key) != after.get(key))


pristine = snapshot()
report = {"patches": {}, "names": sorted(repr(p) for p in ALL)}
for patch in ALL:
    patch.apply()
    applied = changed(pristine, snapshot())
    patch.undo()
    report["patches"][repr(patch)] = {"applied": applied, "after_undo": changed(pristine, snapshot())}

import os
os.environ["VERL_ENGINE_DEVICE"] = "cpu"  # as under VERL_PLATFORM=cpu, without selecting verl's platform here
with patches.applied(patches.CPU_PATCHES):
    import torch
    from megatron.core import tensor_parallel
    from mbridge.core.bridge import _MODEL_REGISTRY
    from verl.plugin.platform import PlatformRegistry
    from verl.utils.distributed import initialize_global_process_group_ray
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    report["while_applied"] = {
        "current_device": torch.cuda.current_device(),
        "rng_tracker": type(tensor_parallel.get_cuda_rng_tracker()).__name__,
        "platform": PlatformRegistry.get("cpu").__name__,
        "engine": EngineRegistry.get_engine_cls("language_model", "megatron").__name__,
        "backend_default": initialize_global_process_group_ray.__defaults__[-1],
        "bridge": _MODEL_REGISTRY["mimo"].__name__,
        "replica": RolloutReplicaRegistry.get("hf_cpu").__name__,
        "adapter": _ROLLOUT_REGISTRY[("hf_cpu", "async")],
    }
    report["all_applied"] = all(p.applied for p in patches.CPU_PATCHES)
report["after_all"] = changed(pristine, snapshot())
print(json.dumps(report))
"""


def test_every_patch_is_undone_and_leaves_torch_cuda_megatron_verl_and_mbridge_as_they_were():
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    proc = subprocess.run([sys.executable, "-c", _ROUND_TRIP], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    every = [value for value in vars(patches).values() if isinstance(value, patches.Patch)]
    assert set(patches.CPU_PATCHES) < set(every)  # with the GPU check's bridges and the testing build's norm patch
    host_reads = repr(patches.tensor_host_reads(lambda name, original: original))  # one per host-sync counter
    assert sorted(report["patches"]) == sorted([*(repr(patch) for patch in every), host_reads])
    for name, result in report["patches"].items():
        assert result["applied"], f"{name} changed nothing"
        assert result["after_undo"] == [], f"{name} left {result['after_undo']}"
    assert report["while_applied"] == {
        "current_device": "cpu", "rng_tracker": "CPURNGStatesTracker", "platform": "PlatformCPU",
        "engine": "CPUMegatronMTPEngineWithLMHead", "backend_default": "cpu:gloo", "bridge": "CPUMimoBridge",
        "replica": "CPURolloutReplica", "adapter": "verl_cpu.rollout.CPUServerAdapter",
    }
    assert report["all_applied"] and report["after_all"] == []


def test_applied_undoes_only_what_it_applied():
    outer, inner = patches.ItemPatch("os:environ", {"VERL_CPU_TEST_A": lambda o: "a"}, replaces="", why=""), \
        patches.ItemPatch("os:environ", {"VERL_CPU_TEST_B": lambda o: "b"}, replaces="", why="")
    with patches.applied([outer]):
        with patches.applied([outer, inner]):
            assert (os.environ["VERL_CPU_TEST_A"], os.environ["VERL_CPU_TEST_B"]) == ("a", "b")
        assert outer.applied and not inner.applied and "VERL_CPU_TEST_B" not in os.environ
    assert not outer.applied and "VERL_CPU_TEST_A" not in os.environ


# ---------------------------------------------------------------------------------------------------------
# nothing else in verl_cpu patches third-party code
# ---------------------------------------------------------------------------------------------------------
THIRD_PARTY = ("torch", "megatron", "verl", "mbridge", "transformers")


def _third_party_bindings(tree: ast.Module) -> dict[str, str]:
    """``{local name: dotted path}`` of every import of a third-party module or object in ``tree``."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in THIRD_PARTY:
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in THIRD_PARTY and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_class(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    try:
        return isinstance(getattr(importlib.import_module(module), name), type)
    except (ImportError, AttributeError, ValueError):
        return False


def third_party_writes(path: Path) -> list[str]:
    """Assignments to attributes of imported third-party modules / classes, ``setattr`` on them, item writes
    into their objects (a class's own state, e.g. Megatron's loss tracker, excepted) and ``sys.modules``."""
    tree = ast.parse(path.read_text())
    bindings = _third_party_bindings(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            root = _root(target)
            if root in bindings and (isinstance(target, ast.Attribute) or not _is_class(bindings[root])):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and _root(node.args[0]) in bindings:
            found.append(f"{path.name}:{node.lineno} setattr({ast.unparse(node.args[0])}, ...)")
        if isinstance(node, ast.Attribute) and node.attr == "modules" and _root(node) == "sys":
            found.append(f"{path.name}:{node.lineno} sys.modules")
    return found


def test_the_scan_finds_patches(tmp_path):
    source = tmp_path / "patchy.py"
    source.write_text("import sys\nimport torch\nfrom verl.workers.rollout import base as rb\n"
                      "from mbridge.core.bridge import _MODEL_REGISTRY\n"
                      "torch.cuda.current_device = None\nsetattr(torch.cuda, 'x', 1)\nrb._ROLLOUT_REGISTRY['k'] = 1\n"
                      "_MODEL_REGISTRY['mimo'] = 1\nfor m in list(sys.modules.values()): pass\n")
    assert len(third_party_writes(source)) == 5


def test_only_the_patches_module_patches_third_party_code():
    files = [p for p in sorted(Path(verl_cpu.__file__).parent.rglob("*.py")) if p.name != "patches.py"]
    found = [hit for path in files for hit in third_party_writes(path)]
    assert found == [], found
