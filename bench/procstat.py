"""CPU time of processes from /proc: who spent how much CPU during a measurement.

A live process's time comes from /proc/<pid>/task/*/schedstat (nanoseconds on a CPU, every
thread), or from utime + stime in clock ticks where schedstat is missing. A group is one
process or a postmaster with its children; a postmaster's cutime/cstime (its reaped
children's time, in ticks) is added too, so a backend that exits mid-measurement still counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

TICK = float(os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True, slots=True)
class ProcTimes:
    ppid: int
    # Own CPU (utime + stime) and reaped children's CPU (cutime + cstime), in seconds.
    own: float
    children: float


def read(pid: int | str) -> ProcTimes | None:
    """One process's times, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; fields 3.. follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    own = _schedstat(pid)
    if own is None:
        own = (utime + stime) / TICK
    return ProcTimes(int(fields[1]), own, (cutime + cstime) / TICK)


def _schedstat(pid: int | str) -> float | None:
    """Seconds on a CPU over every thread of ``pid`` (ns resolution), None if unavailable."""
    total, read_any = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
            read_any = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that just exited, or no schedstat in this kernel
    return total / 1e9 if read_any else None


def _all() -> dict[int, ProcTimes]:
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            times = read(entry.name)
            if times is not None:
                found[int(entry.name)] = times
    return found


def machine_busy() -> float:
    """CPU seconds all processes spent so far (every CPU, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    ticks = [int(v) for v in parts]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest/guest_nice are already counted in user/nice.
    return (sum(ticks[:8]) - idle) / TICK


class CpuGroups:
    """Named groups of processes: single pids, and postmasters with their children."""

    def __init__(
        self, single: Mapping[str, int | None], trees: Mapping[str, Iterable[int | None]]
    ) -> None:
        self.single = {name: pid for name, pid in single.items() if pid is not None}
        self.trees = {name: [p for p in pids if p is not None] for name, pids in trees.items()}

    @property
    def names(self) -> list[str]:
        return [*self.single, *self.trees]

    def sample(self) -> dict[str, float]:
        """CPU seconds so far per group, plus ``_machine`` (all processes)."""
        out: dict[str, float] = {}
        for name, pid in self.single.items():
            times = read(pid)
            out[name] = times.own if times is not None else 0.0
        if self.trees:
            table = _all()
            for name, roots in self.trees.items():
                root_set = set(roots)
                total = 0.0
                for pid, times in table.items():
                    if pid in root_set:
                        total += times.own + times.children
                    elif times.ppid in root_set:
                        total += times.own
                out[name] = total
        out["_machine"] = machine_busy()
        return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds spent between two samples, per group; ``other`` is everything else."""
    spent = {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}
    machine = spent.pop("_machine", 0.0)
    spent["other"] = max(0.0, machine - sum(spent.values()))
    return spent


def memory_mib(pid: int | None) -> dict[str, float] | None:
    """A process's resident set now (VmRSS) and at its peak so far (VmHWM), in MiB, from
    /proc/<pid>/status; None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) / 1024  # kB
    if "VmRSS" not in found:
        return None  # a zombie has no memory lines
    return {"rss": found["VmRSS"], "hwm": found.get("VmHWM", found["VmRSS"])}


class RssWatch:
    """One process's resident memory over a run: a sample at the start, whenever asked (after
    every measurement), and at the end; the peak is the kernel's VmHWM (every page the process
    ever had resident at once, between samples too)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self.hwm: float | None = None

    def sample(self) -> float | None:
        found = memory_mib(self.pid)
        if found is None:
            return None
        self.samples.append(found["rss"])
        self.hwm = found["hwm"]
        return found["rss"]

    def summary(self) -> dict[str, float | int | None]:
        """Start, peak and end in MiB (None without samples)."""
        if not self.samples:
            return {"start_mib": None, "peak_mib": None, "end_mib": None, "samples": 0}
        peak = max(self.samples)
        return {
            "start_mib": self.samples[0],
            "peak_mib": max(peak, self.hwm or peak),
            "end_mib": self.samples[-1],
            "max_sampled_mib": peak,
            "samples": len(self.samples),
        }
