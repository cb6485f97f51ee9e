"""The exec workloads the cases run on the target, and the bytes each must produce.

Every workload is an argv (``Start.command``, PROTOCOL 3.2) of POSIX ``sh`` and a few standard
utilities (``cat``, ``head``, ``printf``, ``seq``, ``sleep``, ``stty``, ``kill``, ``trap``);
the README lists them as the target's preconditions.  Output is deterministic, so every case
compares what it received with what the workload must have written, byte for byte, instead of
trusting one client against another.
"""

from __future__ import annotations

__all__ = [
    "ALL_BYTES_PRINTF",
    "BLOCK",
    "block_bytes",
    "block_generator",
    "interleaved",
    "interleaved_expected",
    "seq_expected",
    "seq_lines_for",
    "sh",
    "within_limit",
]

MIB = 1024 * 1024


def within_limit(limit: int, size: int) -> int:
    """``size``, or less where the target's output limit (PROTOCOL 6.5; 0: none) is smaller:
    three quarters of it, which leaves room for whatever a server counts besides the data."""
    return size if limit == 0 else min(size, limit * 3 // 4)


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def interleaved(lines: int, delay: float = 0.02, tail: str = "") -> list[str]:
    """``lines`` numbered lines on stdout and on stderr, one pair every ``delay`` seconds."""
    return sh(
        f"i=1; while [ $i -le {lines} ]; do printf 'out %04d\\n' $i; "
        f"printf 'err %04d\\n' $i >&2; i=$((i+1)); sleep {delay}; done{tail}"
    )


def interleaved_expected(lines: int) -> tuple[bytes, bytes]:
    out = b"".join(b"out %04d\n" % i for i in range(1, lines + 1))
    err = b"".join(b"err %04d\n" % i for i in range(1, lines + 1))
    return out, err


#: A printf format that writes every byte value 0-255 once (octal escapes, POSIX printf).
ALL_BYTES_PRINTF = "".join(f"\\{value:03o}" for value in range(256))


def seq_expected(first: int, last: int) -> bytes:
    """What ``seq FIRST LAST`` writes."""
    return "".join(f"{i}\n" for i in range(first, last + 1)).encode()


def seq_lines_for(size: int) -> int:
    """The smallest N such that ``seq 1 N`` writes at least ``size`` bytes."""
    total, n, width, bound = 0, 0, 1, 9
    while True:
        # Numbers of ``width`` digits, up to ``bound``, take ``width + 1`` bytes each.
        count = bound - n
        if total + count * (width + 1) >= size:
            return n + -(-(size - total) // (width + 1))
        total += count * (width + 1)
        n, width, bound = bound, width + 1, bound * 10 + 9


#: One block of the flow-controlled generator: 65536 lines of 16 bytes.
BLOCK = 1024 * 1024

_BLOCK_SCRIPT = (
    # Block i is 'block %09d\n' doubled 16 times (1 MiB); one block per line read on stdin,
    # so the client never has more than its window of blocks outstanding (no eviction).
    "nl='\n'; i=0; while read ack; do "
    's="block $(printf %09d $i)$nl"; j=0; '
    'while [ $j -lt 16 ]; do s="$s$s"; j=$((j+1)); done; '
    "printf '%s' \"$s\"; i=$((i+1)); done"
)


def block_generator() -> list[str]:
    return sh(_BLOCK_SCRIPT)


def block_bytes(index: int) -> bytes:
    return (b"block %09d\n" % index) * (BLOCK // 16)
