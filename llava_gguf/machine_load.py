"""How much of the machine other processes used while something ran (the probes' verdicts and the
benchmarks' figures count only when the machine was calm), and timing settings against each other on
a machine others use (``alternate``).

Linux: the CPU time the whole machine spent busy (``/proc/stat``: user, nice, system, irq, softirq and
steal jiffies) less this process's own (``/proc/self/stat``: utime and stime, every thread of it, plus
cutime and cstime, the children it has waited for, so a benchmark's reaped runner is its own), over the
span measured. Where ``/proc`` is missing (macOS, the BSDs), the one-minute load average read when the
span starts, less this process's running thread, stands for the other processes; it counts threads
waiting to run as well as running ones and lags by a minute, so there the machine counts as busy only
when others take more than half its cores (a compile, another model), the load that a probe's
alternation and best-of cannot see through. Where neither exists (Windows) the load is unknown and
counts as calm.
"""

from __future__ import annotations

import enum
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Other processes' cores, on average, above which a span counts as busy. A tenth of a core is well above
# an idle machine's background (kernel threads, a shell: a few hundredths) and, on two cores, is 5% of
# the machine: the margin the repack decision asks for (GAIN); the benchmarks' DISTURBED mark is the same.
BUSY_CORES = 0.1
LOADAVG_BUSY_FRACTION = 0.5  # of the cores, with the load average alone (see above)


class LoadSource(str, enum.Enum):
    PROC = "proc"  # /proc/stat and /proc/self/stat
    LOADAVG = "loadavg"  # os.getloadavg() at the start
    UNKNOWN = "unknown"  # counts as calm


@dataclass(frozen=True)
class MachineLoad:
    """Other processes' use of the machine over ``wall_s`` seconds."""

    wall_s: float
    other_cpu_s: float | None  # None: unknown
    source: LoadSource

    @property
    def other_cores(self) -> float | None:
        """Other processes' cores on average over the span."""
        if self.other_cpu_s is None:
            return None
        return self.other_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def busy(self, threshold: float = BUSY_CORES) -> bool:
        """Whether others used more than ``threshold`` cores on average (see the module's note)."""
        cores = self.other_cores
        if cores is None:
            return False
        if self.source is LoadSource.LOADAVG:
            threshold = max(threshold, LOADAVG_BUSY_FRACTION * (os.cpu_count() or 1))
        return cores > threshold

    def describe(self) -> str:
        """E.g. "other processes used 1.92 cores over 1.4 s"."""
        cores = self.other_cores
        if cores is None:
            return "the machine's load is unknown here"
        what = "other processes used" if self.source is LoadSource.PROC else "the load average showed"
        return f"{what} {cores:.2f} cores over {self.wall_s:.1f} s"

    def to_json(self) -> dict[str, object]:
        return {"wall_s": self.wall_s, "other_cpu_s": self.other_cpu_s, "source": self.source.value}

    @classmethod
    def from_json(cls, entry: object) -> MachineLoad:
        """``ValueError`` when malformed."""
        try:
            other = entry["other_cpu_s"]  # type: ignore[index]
            return cls(float(entry["wall_s"]), None if other is None else float(other),  # type: ignore[index]
                       LoadSource(entry["source"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed machine load: {e}") from e


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, IndexError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float | None:
    """CPU seconds of this process (all its threads) and of the children it has waited for
    (``/proc/self/stat``), or None."""
    try:
        # the command name (field 2) may hold spaces: count fields after its closing parenthesis
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])  # fields 14-17 of proc(5)
    except (OSError, IndexError, ValueError):
        return None
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has none
        return None


class LoadMeter:
    """Started on creation; ``stop()`` says how much other processes used since."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._busy, self._own = machine_busy_s(), own_cpu_s()
        self._load_average = None if self._busy is not None else _load_average()

    def stop(self) -> MachineLoad:
        wall = time.perf_counter() - self._start
        busy, own = machine_busy_s(), own_cpu_s()
        if None not in (busy, own, self._busy, self._own):
            other = (busy - self._busy) - (own - self._own)  # type: ignore[operator]
            return MachineLoad(wall, max(0.0, other), LoadSource.PROC)
        if self._load_average is not None:
            # this process's running thread is in the average too
            return MachineLoad(wall, max(0.0, self._load_average - 1.0) * wall, LoadSource.LOADAVG)
        return MachineLoad(wall, None, LoadSource.UNKNOWN)


def available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable on Linux, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# -- timing on a shared machine ---------------------------------------------------------------

Timing = tuple[float, ...]  # seconds of one run's parts (e.g. prefill, decode)


def alternate(runs: Mapping[str, Callable[[], Timing]], *, min_rounds: int = 3, max_rounds: int = 8,
              min_seconds: float = 1.0, max_seconds: float = 3.0) -> dict[str, Timing]:
    """Each setting's best seconds (part by part) over rounds that run every setting once, after one
    warm-up each (first-touch pages, thread pools, caches), the order reversed every other round
    (A B, B A, A B ...: each follows the other as often, so what one leaves behind, spinning BLAS
    threads or an evicted cache, weighs on both). Two rounds at least; ``min_rounds`` while the measured
    time stays under ``max_seconds`` (on a busy machine the verdict is provisional anyway: no use
    measuring it long); then more, up to ``max_rounds``, until ``min_seconds``: a pause of the machine
    costs one run, not the verdict."""
    names = list(runs)
    for name in names:
        runs[name]()
    best: dict[str, Timing] = {}
    start, rounds = time.perf_counter(), 0
    while _another_round(rounds, time.perf_counter() - start, min_rounds, max_rounds, min_seconds, max_seconds):
        for name in names if rounds % 2 == 0 else reversed(names):
            timing = runs[name]()
            best[name] = tuple(map(min, best[name], timing)) if name in best else timing
        rounds += 1
    return best


def _another_round(rounds: int, elapsed: float, min_rounds: int, max_rounds: int, min_seconds: float,
                   max_seconds: float) -> bool:
    return (rounds < 2 or (rounds < min_rounds and elapsed < max_seconds)
            or (rounds < max_rounds and elapsed < min_seconds))
