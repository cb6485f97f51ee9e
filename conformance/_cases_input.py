"""Cases of PROTOCOL 7: stdin, EOF, the stdin size limit, TTYs and resize.

``cat`` is the witness for stdin: what it prints is exactly what reached the process.  For
terminals, ``stty size`` shows the size the process sees and a ``WINCH`` trap shows that it
was told of a change.
"""

from __future__ import annotations

import grpc

from execstream import wire

from . import _workloads as w
from ._case import case, expect, expect_equal
from ._checks import expect_flow, expect_output, expect_rejected
from ._context import CaseContext

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
ROW_SIZE = "Session: `resize` or `start.terminal_size` with `Width` or `Height` ≤ 0"


@case(
    "7.1",
    "stdin-and-eof",
    "stdin bytes reach the process in order and an empty stdin closes it (EOF)",
)
async def stdin_and_eof(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.create(c, e, ["cat"])
    await client.until_ready()
    parts = [b"hello\n", bytes(range(256)), b"\x00" * 1000, b"bye\n"]
    for part in parts:
        await client.stdin(part)
    await client.stdin(b"")
    await client.completed()
    expect_flow(client)
    expect_output(client, b"".join(parts))
    expect_equal(client.exit_code, 0, "exit code of cat after EOF")


@case(
    "7.1",
    "stdin-from-several-clients",
    "stdin from several clients reaches the process in arrival order",
)
async def stdin_from_several(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    other = await ctx.attach(c, e, half_close=False, label="other")
    await other.until_ready()
    want = b""
    for n in range(3):
        for client in (creator, other):
            line = f"{client.label} line {n}\n".encode()
            await client.stdin(line)
            want += line
            await creator.until_output(want)
    await other.stdin(b"")
    await creator.completed()
    await other.completed()
    for client in (creator, other):
        expect_flow(client)
        expect_output(client, want)


@case(
    "7.1",
    "stdin-after-eof",
    "non-empty stdin after EOF ends the sender's stream with FAILED_PRECONDITION",
    row="Session: non-empty `stdin` after EOF was sent",
    status="FAILED_PRECONDITION",
)
async def stdin_after_eof(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.create(c, e, w.sh("cat; echo eof-seen; sleep 30"))
    await client.until_ready()
    await client.stdin(b"x\n")
    await client.stdin(b"")
    await client.until_output(b"x\neof-seen\n")
    await client.stdin(b"more\n")
    await expect_rejected(ctx, client, FAILED_PRECONDITION, "stdin after EOF")


@case(
    "7.5",
    "close-stdin-at-start",
    "a start with close_stdin gives the process EOF at once, and refuses stdin after it",
    row="Session: non-empty `stdin` after EOF was sent",
    status="FAILED_PRECONDITION",
    needs=("create",),
)
async def close_stdin_at_start(ctx: CaseContext) -> None:
    c = ctx.container_id()
    # A creator that leaves right after Ready: the EOF is part of the start, so nothing
    # the server had not read yet can be lost with the session.
    left = ctx.exec_id("gone")
    gone = await ctx.create(c, left, ["cat"], close_stdin=True)
    await gone.until_ready()
    gone.cancel()
    after = await (await ctx.attach(c, left, label="after")).finished()
    expect_flow(after)
    expect_equal(after.exit_code, 0, "exit code of cat, stdin closed at start, creator gone")
    client = await ctx.create(
        c, ctx.exec_id(), w.sh("cat; echo eof-seen; sleep 30"), close_stdin=True
    )
    await client.until_output(b"eof-seen\n")
    await client.stdin(b"more\n")
    await expect_rejected(ctx, client, FAILED_PRECONDITION, "stdin after close_stdin")


@case(
    "7.1",
    "tty-eof-character",
    "an empty stdin on a TTY exec sends the terminal's EOF character",
)
async def tty_eof(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.create(c, e, w.sh("cat >/dev/null; echo cat-ended:$?"), tty=True)
    await client.until_ready()
    await client.stdin(b"abc\n")
    await client.until_output(b"abc")
    await client.stdin(b"")
    await client.completed()
    expect_flow(client)
    expect(b"cat-ended:0" in client.stdout, "cat ended by EOF", repr(client.stdout[-200:]))


@case(
    "7.2",
    "stdin-over-limit",
    "a stdin message over the limit ends the sender's stream with INVALID_ARGUMENT only",
    row="Session: `stdin` larger than the limit",
    status="INVALID_ARGUMENT",
)
async def stdin_over_limit(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    sender = await ctx.attach(c, e, half_close=False, label="sender")
    await sender.until_ready()
    await sender.stdin(b"x" * (ctx.target.stdin_bytes + 1))
    await expect_rejected(ctx, sender, INVALID_ARGUMENT, "stdin over the limit")
    again = await ctx.attach(c, e, label="sender-again")
    await again.until_ready()
    await creator.stdin(b"ok\n")
    await creator.stdin(b"")
    for client in (creator, again):
        await client.completed()
        expect_flow(client)
        expect_output(client, b"ok\n")
        expect_equal(client.exit_code, 0, f"{client.label} exit code")


@case(
    "7.4",
    "stdin-at-limit",
    "a stdin message of exactly the stdin limit is accepted, even above gRPC's 4 MiB",
)
async def stdin_at_limit(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    limit = ctx.target.stdin_bytes
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    await creator.stdin(b"x" * limit)
    await creator.stdin(b"")
    await creator.completed()
    expect_flow(creator)
    expect_equal(len(creator.stdout), limit, "bytes the process read and echoed")
    expect_equal(creator.exit_code, 0, "exit code")


@case(
    "7.3",
    "resize-reaches-process",
    "a TTY starts at 80x24 and a resize gives the process SIGWINCH and the new size",
)
async def resize_reaches_process(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    script = 'trap "stty size; exit 0" WINCH; stty size; while :; do sleep 0.05; done'
    client = await ctx.create(c, e, w.sh(script), tty=True)
    await client.until_output(b"24 80")
    await client.resize(100, 40)
    await client.completed()
    expect_flow(client)
    expect(b"40 100" in client.stdout, "'40 100' from stty size after the resize", client.text())
    expect_equal(client.exit_code, 0, "exit code (the WINCH trap ran)")


@case(
    "7.3",
    "resize-non-tty",
    "resize on a non-TTY exec ends the sender's stream with FAILED_PRECONDITION only",
    row="Session: `resize` on a non-TTY exec",
    status="FAILED_PRECONDITION",
)
async def resize_non_tty(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    sender = await ctx.attach(c, e, half_close=False, label="sender")
    await sender.until_ready()
    await sender.resize(80, 24)
    await expect_rejected(ctx, sender, FAILED_PRECONDITION, "resize on a non-TTY exec")
    await creator.stdin(b"fine\n")
    await creator.stdin(b"")
    await creator.completed()
    expect_flow(creator)
    expect_output(creator, b"fine\n")


@case(
    "7.3",
    "resize-non-positive",
    "a resize with Width or Height <= 0 ends the sender's stream with INVALID_ARGUMENT only",
    row=ROW_SIZE,
    status="INVALID_ARGUMENT",
)
async def resize_non_positive(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, w.sh("read x; echo got-$x"), tty=True)
    await creator.until_ready()
    for width, height in ((0, 24), (80, -1)):
        sender = await ctx.attach(c, e, half_close=False, label=f"resize-{width}x{height}")
        await sender.until_ready()
        await sender.resize(width, height)
        await expect_rejected(ctx, sender, INVALID_ARGUMENT, f"resize to {width}x{height}")
    await creator.stdin(b"it\n")
    await creator.completed()
    expect_flow(creator)
    expect(b"got-it" in creator.stdout, "the exec unaffected", creator.text())


@case(
    "7.3",
    "initial-terminal-size",
    "start.terminal_size is the TTY's size from the first instruction (80x24 when unset)",
)
async def initial_terminal_size(ctx: CaseContext) -> None:
    c = ctx.container_id()
    size = wire.Resize(width=101, height=31)
    client = await ctx.run(c, ctx.exec_id(), w.sh("stty size"), tty=True, terminal_size=size)
    expect_flow(client)
    ready = client.readies[0].terminal_size
    expect(
        ready is not None and (ready.width, ready.height) == (101, 31),
        "ready.terminal_size 101x31, the size given in start",
        client.describe(),
    )
    expect(client.stdout.startswith(b"31 101"), "'31 101' from stty size", client.text())
    default = await ctx.run(c, ctx.exec_id(), w.sh("stty size"), tty=True)
    expect_flow(default)
    expect(default.stdout.startswith(b"24 80"), "'24 80' without terminal_size", default.text())
    plain = await ctx.run(c, ctx.exec_id(), w.sh("echo plain"), terminal_size=size)
    expect_flow(plain)
    expect(
        plain.readies[0].terminal_size is None,
        "terminal_size ignored without tty (no terminal_size in ready)",
        plain.describe(),
    )


@case(
    "7.3",
    "start-terminal-size-non-positive",
    "a start.terminal_size with Width or Height <= 0 fails with INVALID_ARGUMENT",
    row=ROW_SIZE,
    status="INVALID_ARGUMENT",
)
async def start_terminal_size_non_positive(ctx: CaseContext) -> None:
    c = ctx.container_id()
    for width, height in ((0, 24), (80, -3)):
        e = ctx.exec_id()
        size = wire.Resize(width=width, height=height)
        refused = await ctx.create(
            c, e, ["true"], half_close=True, tty=True, terminal_size=size, label="refused"
        )
        await expect_rejected(ctx, refused, INVALID_ARGUMENT, f"terminal_size {width}x{height}")
        again = await ctx.run(c, e, ["true"], tty=True)
        expect_flow(again)
