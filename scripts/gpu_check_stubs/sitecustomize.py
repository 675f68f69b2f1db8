"""Import-only stand-ins for what verl imports at module level but a one-process GPU check never uses.

On the bare GPU machine (no network, at most 64 MiB carried) ``ray`` alone is larger than what may travel, and
``import verl`` also imports ``wandb``, ``datasets`` and ``opentelemetry``. With this directory on
``PYTHONPATH`` (``scripts/gpu_check.sh`` puts it there, for the check only) Python imports this module at
start-up, and every import of those packages (and their submodules) gets a stand-in module, also where the
real package is installed. Reading an attribute of a stand-in gives another stand-in, and so does a call made
by a module's top-level code while it is imported (``from ray import x``, ``@ray.remote`` on a class, a base
class); a call from running code (inside any function) raises, naming what was called, so the check never
silently runs with a fake. The names stubbed are printed to stderr at exit when any was imported.
"""

import atexit
import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = ("ray", "wandb", "datasets", "opentelemetry", "fastapi", "starlette", "uvicorn")
_imported: list[str] = []


class StubCalled(RuntimeError):
    pass


class _Stand_in(types.ModuleType):
    """A module (or any attribute of one) that exists for imports only."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package: submodules import too
        self.__file__ = f"<gpu-check stand-in for {name}>"

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        child = _Stand_in(f"{self.__name__}.{attr}")
        setattr(self, attr, child)
        return child

    def __call__(self, *args, **kwargs):
        if not _called_at_import():
            raise StubCalled(
                f"{self.__name__}(...) was called, but {self.__name__.split('.')[0]} is an import-only stand-in in "
                "the GPU check (scripts/gpu_check_stubs): the checked code path must not need it"
            )
        return _Stand_in(f"{self.__name__}()")

    def __or__(self, other):  # ``Stub | None`` in module-level annotations
        return self

    __ror__ = __or__

    def __getitem__(self, item):  # ``Stub[T]``
        return self

    def __mro_entries__(self, bases):
        if not _called_at_import():
            raise StubCalled(f"a class derives from {self.__name__}, an import-only stand-in in the GPU check")
        return ()


def _called_at_import() -> bool:
    """Whether the stand-in is used by a module's top-level code (the frame two up from the stand-in's method)."""
    return sys._getframe(2).f_code.co_name == "<module>"


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        _imported.append(spec.name)
        return _Stand_in(spec.name)

    def exec_module(self, module):
        pass


def _report():
    if _imported:
        roots = sorted({name.split(".")[0] for name in _imported})
        print(f"gpu_check: import-only stand-ins used for {', '.join(roots)}", file=sys.stderr)


sys.meta_path.insert(0, _Finder())
atexit.register(_report)


class _BareMachine(importlib.abc.MetaPathFinder):
    """``GPU_CHECK_BARE_STACK=1``: only what the bare GPU machine will have can be found.

    That is the standard library, the machine's own stack (``scripts/gpu_check_stack.txt`` and everything those
    distributions require), the carried wheels (``scripts/gpu_check_wheels.txt``), the stand-ins above and the
    repository's own code. The finders Python had are wrapped so any other top-level package is simply not
    there, as on that machine: its import fails, and code that looks for it optionally
    (``importlib.util.find_spec``) goes on without it. A run of the check's CPU mode under it proves the carried
    wheels cover what the check imports.
    """

    def __init__(self, scripts_dir: str, finders: list):
        import importlib.metadata
        import os

        self.finders = finders
        self.modules_to_dists = importlib.metadata.packages_distributions()  # all of them, before any is hidden
        self.allowed = _distribution_closure(_listed(os.path.join(scripts_dir, "gpu_check_stack.txt")))
        self.allowed |= {_normalized(n) for n in _listed(os.path.join(scripts_dir, "gpu_check_wheels.txt"))}
        self.allowed.add("verl-mtp")
        self.refused: set[str] = set()

    def _present(self, name: str) -> bool:
        root = name.split(".")[0]
        if root in sys.stdlib_module_names or root in STUBBED:
            return True
        dists = self.modules_to_dists.get(root)
        if not dists or any(_normalized(d) in self.allowed for d in dists):
            return True  # repository code, or a package that will be there
        self.refused.add(f"{root} ({', '.join(sorted(set(dists)))})")
        return False

    def find_spec(self, name, path=None, target=None):
        if not self._present(name):
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def find_distributions(self, context=None):
        """Installed metadata (``importlib.metadata.version`` ...) of the distributions that will be there."""
        import importlib.metadata

        context = context or importlib.metadata.DistributionFinder.Context()
        for finder in self.finders:
            for dist in getattr(finder, "find_distributions", lambda c: [])(context):
                if _normalized(dist.metadata["Name"]) in self.allowed:
                    yield dist


def _normalized(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(path: str) -> list[str]:
    """Distribution names of a requirements-style file (versions, markers and comments dropped)."""
    import re

    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])
    return names


def _distribution_closure(roots: list[str]) -> set[str]:
    """``roots`` and every distribution they require (no extras), as installed here."""
    import importlib.metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [_normalized(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normalized(req.name))
    return seen


def _report_refused(finder: _BareMachine):
    if finder.refused:
        print(f"gpu_check: absent on the simulated bare machine: {', '.join(sorted(finder.refused))}",
              file=sys.stderr)


def _simulate_bare_machine() -> None:
    import os

    finders = [f for f in sys.meta_path if not isinstance(f, _Finder) and hasattr(f, "find_spec")]
    bare = _BareMachine(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), finders)
    sys.meta_path[:] = [f for f in sys.meta_path if f not in finders] + [bare]
    atexit.register(_report_refused, bare)


if __import__("os").environ.get("GPU_CHECK_BARE_STACK") == "1":
    _simulate_bare_machine()
