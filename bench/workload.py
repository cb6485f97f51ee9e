"""Commands the benchmark's execs run (the servers start them as subprocesses).

python bench/workload.py ticks COUNT PERIOD_S      # COUNT lines "<time_ns>\\n", one write each
python bench/workload.py paced RATE_MB_S STOPFILE  # 64 KiB writes at RATE until STOPFILE exists
"""

from __future__ import annotations

import os
import sys
import time

BLOCK = b"\0" * (64 * 1024)


def ticks(count: int, period: float) -> None:
    """Write→client latency: each line carries the wall time it was written."""
    for _ in range(count):
        os.write(1, b"%d\n" % time.time_ns())
        time.sleep(period)


def paced(rate_mb_s: float, stopfile: str) -> None:
    """A bulk load of known rate, so that it is the same load for every server."""
    interval = len(BLOCK) / (rate_mb_s * 1e6)
    due = time.monotonic()
    while not os.path.exists(stopfile):
        os.write(1, BLOCK)
        due += interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "ticks":
        ticks(int(args[0]), float(args[1]))
    elif kind == "paced":
        paced(float(args[0]), args[1])
    else:
        raise SystemExit(f"unknown workload {kind!r}")


if __name__ == "__main__":
    main()
