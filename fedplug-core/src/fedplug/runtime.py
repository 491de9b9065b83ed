"""Facts about the process a backend runs in, for sizing thread pools and picking devices."""

from __future__ import annotations

import os
import sys

from fedplug.machine import cores


def cpu_share() -> int:
    """CPU cores this process may use: what Ray gave this simulation worker, else ``OMP_NUM_THREADS``, else the
    machine's (:func:`fedplug.machine.cores`: its affinity capped by a cgroup quota, as the run checks count)."""
    if "ray" in sys.modules and (assigned := _ray_cpus()):
        return assigned
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max(1, int(cores()))


def _ray_cpus() -> int:
    """The CPUs Ray assigned to this worker process; 0 outside a connected Ray worker.

    Ray's ``get_assigned_resources`` asserts that it runs in a worker (a driver, e.g. the
    process that started Ray, gets an ``AssertionError``) and raises ``RaySystemError``
    when the worker is not connected; those two mean "not a worker". Anything else is a bug
    and propagates.
    """
    import ray

    if not ray.is_initialized():
        return 0
    try:
        assigned = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
    except (AssertionError, ray.exceptions.RaySystemError):
        return 0
    return max(1, int(assigned["CPU"])) if assigned.get("CPU") else 0
