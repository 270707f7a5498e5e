"""How many CPU threads torch may use during a call, chosen so that a shared machine does not collapse.

torch's CPU kernels run on OpenMP threads that spin-wait for each other between parallel
regions. When another process holds a core, a thread that has lost its core stalls every
other: on a 2-core machine with two busy processes, 2-thread training steps were measured
10-50x slower than 1-thread ones. The default therefore uses the cores that are idle now,
measured over a fifth of a second from ``/proc/stat`` (the load average lags by a minute:
right after a heavy notebook cell it would still report the cores as busy), and an
explicit ``n_threads`` always wins.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from scanpy import logging as logg


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies since boot of the CPUs this process may run on, from /proc/stat.

    Only those CPUs count: in a container pinned to 2 of a host's 64 cores, the host's other
    cores say nothing about whether ours are free.
    """
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except AttributeError:  # not on Linux
        mine = None
    idle = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                continue
            values = [int(v) for v in fields]
            idle += values[3] + values[4]  # idle + iowait
            total += sum(values)
    return idle, total


def busy_cpus(seconds: float = 0.2) -> float | None:
    """CPUs (of those this process may use) busy with other work right now; None where unknown."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(seconds)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return available_cpus() * (1 - (idle1 - idle0) / (total1 - total0))


def default_threads() -> int:
    """Torch's own thread count, reduced to the cores that are idle now."""
    n = min(torch.get_num_threads(), available_cpus())
    busy = busy_cpus()
    if busy is None:
        return n
    return max(1, min(n, int(available_cpus() - busy + 0.5)))


@contextmanager
def threads(n_threads: int | None):
    """Run the block with ``n_threads`` torch threads (None: :func:`default_threads`), then restore."""
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer or None, not {n_threads!r}.")
    before = torch.get_num_threads()
    n = default_threads() if n_threads is None else n_threads
    if n != before:
        logg.info(f"    using {n} CPU thread(s)" + ("" if n_threads else f" of {before} (the others are busy)"))
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
