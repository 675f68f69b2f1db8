"""Makes this repository's packages unimportable in the patched verl tree's test run (and its children).

Python imports ``sitecustomize`` at start-up from the path, so with this directory on ``PYTHONPATH`` every
interpreter of the run, spawned test ranks included, refuses ``verl_mtp``, ``verl_cpu`` and the example: a
test or verl module that still needs them fails instead of silently using the installed package. verl's
``verl.plugins`` entry point of ``verl_mtp`` fails to load the same way (verl logs it and goes on).
"""

import sys

BLOCKED = ("verl_mtp", "verl_cpu", "verl_mtp_example", "support")


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in the upstream verl tree's test run", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
