"""Facts about the process a backend runs in, for sizing thread pools and picking devices."""

from __future__ import annotations

import os
import sys


def cpu_share() -> int:
    """CPU cores this process may use: what Ray gave this simulation worker, else all cores."""
    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                assigned = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
                if assigned.get("CPU"):
                    return max(1, int(assigned["CPU"]))
        except Exception:
            pass
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
