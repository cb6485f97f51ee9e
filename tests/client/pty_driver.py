"""Interactive sessions of ``execstream`` in a pseudo-terminal, driven with pexpect.

Run as ``python pty_driver.py SCENARIO TARGET [ARGS]``: exit 0 when the scenario went as
expected, else a traceback.  A separate process because pexpect forks, and forking the test
process, where grpc threads run the server, is not safe (grpc: "skipping fork() handlers");
this process never imports grpc.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pexpect

BIN = str(Path(sys.executable).parent)
TARGET = ""


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("EXECSTREAM_")}
    out["EXECSTREAM_TARGET"] = TARGET
    out["PATH"] = os.pathsep.join([BIN, out.get("PATH", "")])
    return out


def shell(command: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """``sh -c COMMAND`` on a terminal of rows x cols, `execstream` on its PATH."""
    return pexpect.spawn(
        "sh", ["-c", command], env=env(), dimensions=(rows, cols), timeout=30, echo=False
    )


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return int(child.exitstatus)


# A process that ignores INT and QUIT: only the detach keys get the user out.
STUBBORN = 'trap "" INT QUIT; echo ready; read line; echo "got $line"; stty size; exit 4'


def detach_and_rejoin() -> None:
    # `stty -g` before and after: the terminal comes back exactly as it was.
    child = shell(f"stty -g; execstream run -it -- sh -c '{STUBBORN}'; echo \"status $?\"; stty -g")
    child.expect(rb"([0-9a-f:]+)\r\n")
    before = child.match.group(1)
    child.expect("ready")
    child.send(b"\x03\x1c")  # Ctrl-C, Ctrl-\: keys for the exec, which ignores them
    child.send(b"\x10\x11")  # Ctrl-P Ctrl-Q
    child.expect(
        rb"detached: exec (run-[0-9a-f]+) in container default keeps running; "
        rb"rejoin with: execstream attach -it default (run-[0-9a-f]+)"
    )
    exec_id = child.match.group(1).decode()
    assert child.match.group(2).decode() == exec_id
    child.expect(rb"status 0\r\n([0-9a-f:]+)\r\n")
    assert child.match.group(1) == before, "the terminal was not restored"
    assert finish(child) == 0

    status = shell(f"execstream status default {exec_id}")
    status.expect(rb"STATE\s+running")
    assert finish(status) == 0

    rejoin = shell(f"execstream attach -it default {exec_id}", 33, 111)
    rejoin.send(b"hello\r")
    rejoin.expect("got hello")
    rejoin.expect("33 111")  # the exec's terminal follows the rejoining one
    assert finish(rejoin) == 4


def partial_detach_sequence() -> None:
    child = shell(
        "execstream run -it --detach-keys ctrl-x,q -- sh -c "
        '\'echo ready; read line; printf "%s" "$line" | od -An -c; exit 2\''
    )
    child.expect("ready")
    child.send(b"\x18a\r")  # ctrl-x then not q: both are typed
    child.expect(rb"030\s+a")
    assert finish(child) == 2


def third_ctrl_c() -> None:
    # execstream itself on the terminal: a shell around it would die of the SIGINT too.
    script = "trap 'echo int' INT; echo ready; while :; do sleep 0.1; done"
    child = pexpect.spawn(
        sys.executable, ["-m", "execstream", "run", "--", "sh", "-c", script], env=env(),
        timeout=30,
    )  # fmt: skip
    child.expect("ready")
    for _ in range(2):
        child.sendintr()
        child.expect("int")  # the first two reach the exec as INT
    child.sendintr()
    child.expect(
        r"detached: exec run-[0-9a-f]+ in container default keeps running; "
        r"rejoin with: execstream attach default run-[0-9a-f]+"
    )
    assert finish(child) == 0


def _child_of(pid: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {pid}")


def sigterm_restores() -> None:
    child = shell(
        "stty -g; execstream run -it -- sh -c 'echo ready; sleep 30'; echo \"status $?\"; stty -g"
    )
    child.expect(rb"([0-9a-f:]+)\r\n")
    before = child.match.group(1)
    child.expect("ready")
    os.kill(_child_of(child.pid), signal.SIGTERM)
    child.expect(r"ended by SIGTERM: exec run-[0-9a-f]+ in container default keeps running")
    child.expect(rb"status 143\r\n([0-9a-f:]+)\r\n")
    assert child.match.group(1) == before, "the terminal was not restored"
    assert finish(child) == 0


def attach_tty(container: str, exec_id: str) -> None:
    child = shell(f"execstream attach -t -i {container} {exec_id}", 40, 132)
    child.send(b"typed\r")
    child.expect("40 132")
    child.expect(re.escape("[typed]"))
    assert finish(child) == 0


SCENARIOS: dict[str, Callable[..., None]] = {
    "detach-and-rejoin": detach_and_rejoin,
    "partial-detach-sequence": partial_detach_sequence,
    "third-ctrl-c": third_ctrl_c,
    "sigterm-restores": sigterm_restores,
    "attach-tty": attach_tty,
}

if __name__ == "__main__":
    TARGET = sys.argv[2]
    SCENARIOS[sys.argv[1]](*sys.argv[3:])
