"""Multi-process (gloo, 2 CPU ranks) parallel-correctness tests of verl_mtp.

Each test runs the single-process reference in the pytest process, runs the same computation sharded over
2 spawned ranks (``support.tiny_mcore.run_cpu_ranks``) and asserts in the parent. Tests that spawn ranks are
marked ``multiprocess`` (``-m "not multiprocess"`` skips them).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared helpers (mtp_parallel_common) import by bare name, here and in ranks
    sys.path.insert(0, _HERE)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multiprocess: spawns 2 CPU processes joined by gloo (torch.distributed) and compares with 1"
    )
