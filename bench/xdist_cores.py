"""pytest plugin: each pytest-xdist worker on cores of its own, so that N workers on a machine of many cores each run
like a small VM (bench/remote-tests.sh):

    MEDCOT_CORES_PER_WORKER=2 OMP_NUM_THREADS=2 python -m pytest -p bench.xdist_cores -n 7 --dist loadfile

Worker gwK gets cores 2K and 2K+1 of the ones it may use (its children, the jobs that tests start, inherit them).
Loaded as a plugin, it runs before the test modules import torch, so torch's thread pool sizes itself to them.
"""

from __future__ import annotations

import os

_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _per = int(os.environ.get("MEDCOT_CORES_PER_WORKER", "2"))
    _index = int(_worker[2:])
    _cores = sorted(os.sched_getaffinity(0))[_index * _per:(_index + 1) * _per]
    if len(_cores) == _per:
        os.sched_setaffinity(0, _cores)
        os.environ["OMP_NUM_THREADS"] = str(_per)


def pytest_runtest_logreport(report):
    """MEDCOT_FAILURES_LOG=FILE: each failure's traceback into FILE as it happens (in the controller, once), so that a
    run cut short still tells why."""
    path = os.environ.get("MEDCOT_FAILURES_LOG")
    if path and report.failed and not _worker:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
