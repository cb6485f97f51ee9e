"""Strict request parsing for the grpc glue (PROTOCOL 2.5).  Written by hand, not generated.

betterproto2 is lenient: it can accept a field of the wrong wire type or two members of one
``oneof``, and it raises arbitrary exceptions on garbage.  A server must answer
``INVALID_ARGUMENT`` instead (PROTOCOL 2.5), so the generated ``add_ExecServicer_to_server``
hands requests to servicers only through the wrappers here.  Nothing in this module depends on
spec/exec.proto: it works on any betterproto2 message, which is why it lives outside the file
``tools/generate.py`` writes (that one holds only what the proto determines) and is linted,
type-checked and tested like any other module.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import betterproto2
import grpc
import grpc.aio

__all__ = [
    "MalformedMessage",
    "parse_strict",
    "stream_stream_strict",
    "unary_stream_strict",
    "unary_unary_strict",
]

_M = TypeVar("_M")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class MalformedMessage(ValueError):
    """Bytes that are not a valid message of the expected type (PROTOCOL 2.5)."""


def parse_strict(message_type: type[_M], data: bytes) -> _M:
    """``message_type.FromString(data)``, but every malformation raises MalformedMessage
    naming the message type (PROTOCOL 2.5): framing, wire types and oneofs are checked."""
    if not (isinstance(message_type, type) and issubclass(message_type, betterproto2.Message)):
        raise TypeError(f"{message_type!r} is not a betterproto2 message type")
    _scan(data, message_type)
    try:
        message = message_type.FromString(data)
    except Exception as error:
        raise MalformedMessage(
            f"malformed {message_type.__name__}: {type(error).__name__}"
        ) from None
    _check_message(message)
    return message


# -- the decoded message: types of values and oneof groups ------------------------------------


_Check: TypeAlias = Callable[[Any, str], None]


@functools.cache
def _checker(hint: Any) -> _Check:
    """The check of a value against its field's type hint, worked out once per hint: a
    request is checked field by field, and reading the hint each time cost more than
    decoding the request (0.2 ms per ``Start``, measured)."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # X | None: an optional field or a oneof member
        (inner,) = [h for h in typing.get_args(hint) if h is not type(None)]
        check_inner = _checker(inner)

        def optional(value: Any, where: str) -> None:
            if value is not None:
                check_inner(value, where)

        return optional
    if origin is list:
        (item,) = typing.get_args(hint)
        check_item = _checker(item)

        def repeated(value: Any, where: str) -> None:
            if not isinstance(value, list):
                raise MalformedMessage(f"{where} is not repeated")
            for element in value:
                check_item(element, where)

        return repeated
    if origin is dict:
        check_key, check_element = map(_checker, typing.get_args(hint))

        def mapping(value: Any, where: str) -> None:
            if not isinstance(value, dict):
                raise MalformedMessage(f"{where} is not a map")
            for key, element in value.items():
                check_key(key, where)
                check_element(element, where)

        return mapping
    if isinstance(hint, type) and issubclass(hint, betterproto2.Message):
        message_type = hint

        def message(value: Any, where: str) -> None:
            if not isinstance(value, message_type):
                raise MalformedMessage(f"{where} is not a {message_type.__name__}")
            _check_message(value)

        return message
    if hint is float:

        def number(value: Any, where: str) -> None:
            if not isinstance(value, (float, int)) or isinstance(value, bool):
                raise MalformedMessage(f"{where} is not a number")

        return number
    if hint is int:

        def integer(value: Any, where: str) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise MalformedMessage(f"{where} is not an integer")

        return integer
    if isinstance(hint, type):
        scalar_type = hint

        def scalar(value: Any, where: str) -> None:
            if not isinstance(value, scalar_type):
                raise MalformedMessage(f"{where} has the wrong wire type")

        return scalar
    return _unchecked


def _unchecked(value: Any, where: str) -> None:
    pass


@functools.cache
def _hints(message_type: type[betterproto2.Message]) -> dict[str, Any]:
    return typing.get_type_hints(message_type)


@functools.cache
def _fields(
    message_type: type[betterproto2.Message],
) -> tuple[tuple[str, str, _Check, str | None], ...]:
    """(name, where, check, oneof group) of each field of ``message_type``."""
    return tuple(
        (
            field.name,
            f"{message_type.__name__}.{field.name}",
            _checker(_hints(message_type)[field.name]),
            field.metadata["betterproto"].group,
        )
        for field in dataclasses.fields(message_type)  # type: ignore[arg-type]
    )


def _check_message(message: betterproto2.Message) -> None:
    message_type = type(message)
    groups: dict[str, list[str]] = {}
    for name, where, check, group in _fields(message_type):
        value = getattr(message, name)
        check(value, where)
        if group is not None and value is not None:
            groups.setdefault(group, []).append(name)
    for group, members in groups.items():
        if len(members) > 1:
            # PROTOCOL 2.5: rejected, where protobuf would keep the last member.
            raise MalformedMessage(
                f"{message_type.__name__}.{group} has {len(members)} members set: "
                + ", ".join(members)
            )


# -- the bytes: framing that betterproto2 does not check --------------------------------------


def _varint(data: bytes, at: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise MalformedMessage(f"{where}: truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


@functools.cache
def _nested_types(
    message_type: type[betterproto2.Message],
) -> dict[int, type[betterproto2.Message] | None]:
    """Field number -> message type to scan inside (None: a length-delimited scalar)."""
    nested: dict[int, type[betterproto2.Message] | None] = {}
    for field in dataclasses.fields(message_type):  # type: ignore[arg-type]
        meta = field.metadata["betterproto"]
        hint = _hints(message_type)[field.name]
        inner = [h for h in (hint, *typing.get_args(hint)) if isinstance(h, type)]
        messages = [h for h in inner if issubclass(h, betterproto2.Message)]
        nested[meta.number] = messages[0] if messages and meta.proto_type == "message" else None
    return nested


def _scan(data: bytes, message_type: type[betterproto2.Message], where: str = "") -> None:
    """Check the wire framing that betterproto2 does not: wire types, varints, and lengths
    that stay inside the message (a truncated field would otherwise be read short)."""
    where = where or f"malformed {message_type.__name__}"
    at = 0
    while at < len(data):
        key, at = _varint(data, at, where)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedMessage(f"{where}: field number 0")
        if wire_type == 0:
            _, at = _varint(data, at, where)
        elif wire_type == 1 or wire_type == 5:
            at += 8 if wire_type == 1 else 4
            if at > len(data):
                raise MalformedMessage(f"{where}: truncated field {number}")
        elif wire_type == 2:
            length, at = _varint(data, at, where)
            if at + length > len(data):
                raise MalformedMessage(f"{where}: field {number} runs past the end")
            inner = _nested_types(message_type).get(number)
            if inner is not None:
                _scan(data[at : at + length], inner, f"{where}, field {number} {inner.__name__}")
            at += length
        else:
            raise MalformedMessage(f"{where}: wire type {wire_type} in field {number}")


# -- grpc handlers that parse strictly --------------------------------------------------------

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


async def _parsed(request_type: type[_Req], raw: AsyncIterator[bytes]) -> AsyncIterator[_Req]:
    async for data in raw:
        yield parse_strict(request_type, data)


def unary_unary_strict(
    request_type: type[_Req], behaviour: Callable[[_Req, _Context], Awaitable[_Resp]]
) -> Callable[[bytes, _Context], Awaitable[_Resp]]:
    """A grpc handler taking raw bytes: a malformed request ends with INVALID_ARGUMENT."""

    async def handle(data: bytes, context: _Context) -> _Resp:
        try:
            request = parse_strict(request_type, data)
        except MalformedMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        return await behaviour(request, context)

    return handle


def unary_stream_strict(
    request_type: type[_Req], behaviour: Callable[[_Req, _Context], AsyncIterator[_Resp]]
) -> Callable[[bytes, _Context], AsyncIterator[_Resp]]:
    """A grpc handler taking raw bytes: a malformed request ends with INVALID_ARGUMENT."""

    async def handle(data: bytes, context: _Context) -> AsyncIterator[_Resp]:
        try:
            request = parse_strict(request_type, data)
        except MalformedMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        async for response in behaviour(request, context):
            yield response

    return handle


def stream_stream_strict(
    request_type: type[_Req],
    behaviour: Callable[[AsyncIterator[_Req], _Context], AsyncIterator[_Resp]],
) -> Callable[[AsyncIterator[bytes], _Context], AsyncIterator[_Resp]]:
    """A MalformedMessage raised while the servicer reads its requests ends the call with
    INVALID_ARGUMENT, unless the servicer caught it and chose a status itself."""

    async def handle(raw: AsyncIterator[bytes], context: _Context) -> AsyncIterator[_Resp]:
        try:
            async for response in behaviour(_parsed(request_type, raw), context):
                yield response
        except MalformedMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    return handle
