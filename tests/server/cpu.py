"""A bounded CPU workload, and the CPU time a process used as the test itself reads it.

PROTOCOL 9.4 defines ``cpu_percent`` as CPU time over the window between two samples.  "The
burner shows more than 50 %" is false on a loaded machine (the burner gets less than a core);
what holds under any load is the identity itself: the CPU time the process used between two
samples, read by the test from /proc, equals ``cpu_percent / 100`` times the window, within a
clock tick.  The test brackets each sample with its own clock readings, so the server's window
is known to lie between the two bracket widths.  The burner spends a fixed amount of CPU (not
of wall time) while the test waits, and is idle, blocked on stdin, whenever a sample is taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: /proc counts CPU time in ticks; the two readings of a window may each be one tick off.
TICK_TOLERANCE = 2 / CLK_TCK
#: What the burner spends after "go": small, so a run costs the machine next to nothing.
BURN_SECONDS = 0.2

# Prints "ready PID" once its ballast is resident, burns BURN_SECONDS of CPU after a line on
# stdin, prints "burnt", then blocks on stdin until it is killed.
BURNER = f"""
import os, sys, time
ballast = bytearray(50 << 20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
begin = time.process_time()
while time.process_time() - begin < {BURN_SECONDS}:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/PID/stat`` fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


_T = TypeVar("_T")


@dataclass(frozen=True)
class Bracket:
    """A value obtained between two readings of ``time.monotonic()``."""

    before: float
    after: float


def bracketed(take: Callable[[], _T]) -> tuple[_T, Bracket]:
    before = time.monotonic()
    value = take()
    return value, Bracket(before, time.monotonic())


def assert_percent_matches(percent: float, used: float, first: Bracket, second: Bracket) -> None:
    """``percent`` is ``used`` CPU seconds over a window that starts within ``first`` and
    ends within ``second`` (PROTOCOL 9.4)."""
    shortest = second.before - first.after
    longest = second.after - first.before
    low = percent / 100 * shortest - TICK_TOLERANCE
    high = percent / 100 * longest + TICK_TOLERANCE
    assert low <= used <= high, (
        f"cpu_percent {percent:.1f} over a window of {shortest:.3f}-{longest:.3f} s means "
        f"{low:.3f}-{high:.3f} s of CPU; the process used {used:.3f} s"
    )
