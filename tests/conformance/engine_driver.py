"""The driver command of ``engine_server.py``: register one exec with the engine.

    execstream conformance --target 127.0.0.1:50061 \\
        --driver-command 'python tests/conformance/engine_driver.py /tmp/engine.sock'

The suite runs it once per exec it needs, with ``EXECSTREAM_CONTAINER_ID``,
``EXECSTREAM_EXEC_ID``, ``EXECSTREAM_COMMAND`` (JSON array), ``EXECSTREAM_ENV`` (JSON
object), ``EXECSTREAM_WORKING_DIR`` and ``EXECSTREAM_TTY`` (``0``/``1``) set.  It sends them
to the engine's control socket as one JSON line and exits 0 when the engine answers ``ok``
(the exec is registered), 1 with the engine's message otherwise.  Standard library only and
nothing else imported: the suite may run dozens of these at once.
"""

import json
import os
import socket
import sys


def main(control: str) -> int:
    request = {
        "container_id": os.environ["EXECSTREAM_CONTAINER_ID"],
        "exec_id": os.environ["EXECSTREAM_EXEC_ID"],
        "command": json.loads(os.environ["EXECSTREAM_COMMAND"]),
        "env": json.loads(os.environ["EXECSTREAM_ENV"]),
        "working_dir": os.environ["EXECSTREAM_WORKING_DIR"],
        "tty": os.environ["EXECSTREAM_TTY"] == "1",
    }
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(control)
            connection.sendall(json.dumps(request).encode() + b"\n")
            answer = connection.makefile().readline().strip()
    except OSError as error:
        print(f"engine at {control}: {error}", file=sys.stderr)
        return 1
    if answer != "ok":
        print(answer or "the engine closed the connection", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: engine_driver.py CONTROL_SOCKET", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
