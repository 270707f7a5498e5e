"""How many CPU threads torch may use during a call, chosen so that a shared machine does not collapse.

torch's CPU kernels run on OpenMP threads that spin-wait for each other between parallel
regions. When another process holds a core, a thread that has lost its core stalls every
other: on a 2-core machine with two busy processes, 2-thread training steps were measured
10-50x slower than 1-thread ones. The default therefore uses the cores that are idle now,
measured over a tenth of a second from ``/proc/stat`` (the load average lags by a minute:
right after a heavy notebook cell it would still report the cores as busy), and looks again
about once a second while the call runs, from what the *other* processes used meanwhile
(:func:`rebalance`, called by the data layer once per minibatch): a call that started on an
idle machine drops to the free cores when another process starts, and takes them back when it
ends. An explicit ``n_threads`` always wins.
"""

from __future__ import annotations

import functools
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


def busy_cpus(seconds: float = 0.1) -> float | None:
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


def _own_jiffies() -> int:
    """CPU time of this process so far (all threads), in /proc/stat's units."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def default_threads() -> int:
    """Torch's own thread count, reduced to the cores that are idle now."""
    n = min(torch.get_num_threads(), available_cpus())
    busy = busy_cpus()
    if busy is None:
        return n
    return max(1, min(n, int(available_cpus() - busy + 0.5)))


REBALANCE_SECONDS = 1.0  # how often a governed block looks again at what the other processes use


class _Governor:
    """Re-chooses the thread count of a long call from what *other* processes used since the last look.

    The cores' busy time from /proc/stat less this process's own CPU time (its spinning
    OpenMP threads included) is the other processes' load; the thread count becomes the cores
    it leaves free, between 1 and ``most``, each time :meth:`tick` finds that at least
    ``REBALANCE_SECONDS`` have passed.
    """

    def __init__(self, most: int):
        self.most, self.last = most, self._sample()

    @staticmethod
    def _sample():
        try:
            return time.monotonic(), *_cpu_times(), _own_jiffies()
        except (OSError, ValueError, IndexError):
            return None

    def tick(self) -> None:
        if self.last is None or time.monotonic() - self.last[0] < REBALANCE_SECONDS:
            return
        now = self._sample()
        if now is None:
            return
        (_, idle0, total0, own0), (_, idle1, total1, own1) = self.last, now
        self.last = now
        if total1 <= total0:
            return
        cpus = available_cpus()
        others = cpus * ((total1 - total0) - (idle1 - idle0) - (own1 - own0)) / (total1 - total0)
        n = max(1, min(self.most, int(cpus - max(others, 0.0) + 0.5)))
        if n != torch.get_num_threads():
            logg.debug(f"    now {n} CPU thread(s): other processes use {max(others, 0.0):.1f} of {cpus} CPUs")
            torch.set_num_threads(n)


_governor: _Governor | None = None


def rebalance() -> None:
    """Inside a :func:`threads` block with the default thread count: follow the machine's load (cheap; rate-limited).

    The data layer calls it once per minibatch, so every tool's long loops adapt.
    """
    if _governor is not None:
        _governor.tick()


@contextmanager
def threads(n_threads: int | None):
    """Run the block with ``n_threads`` torch threads (None: :func:`default_threads`, re-chosen as the load changes).

    With None the count starts from the cores idle now and follows the other processes' load
    while the block runs (:func:`rebalance`). Nested blocks with None keep the outer block's rule.
    """
    global _governor
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer or None, not {n_threads!r}.")
    if n_threads is None and _governor is not None:  # already governed by an outer call
        yield torch.get_num_threads()
        return
    before, outer = torch.get_num_threads(), _governor
    n = default_threads() if n_threads is None else n_threads
    if n != before:
        logg.info(f"    using {n} CPU thread(s)" + ("" if n_threads else f" of {before} (the others are busy)"))
        torch.set_num_threads(n)
    _governor = _Governor(min(before, available_cpus())) if n_threads is None else None
    try:
        yield n
    finally:
        _governor = outer
        torch.set_num_threads(before)


def cpu_threads(tool):
    """Decorate a tool so that it runs under :func:`threads` (its ``n_threads`` argument if it has one, else None)."""
    @functools.wraps(tool)
    def governed(*args, **kwargs):
        with threads(kwargs.get("n_threads")):
            return tool(*args, **kwargs)

    return governed
