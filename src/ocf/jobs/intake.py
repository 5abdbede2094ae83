"""Job creation bodies, decoded a slice at a time so a large one never stalls the event loop.

``json.loads`` of a 32 MiB list of a million small inputs is one C call
that holds the interpreter for a second or more, and nothing else on the
node runs meanwhile (not even on another thread: the call keeps the GIL).
Here each element is decoded on its own and the decoder yields to Trio
every ``slice_size`` elements, so the longest pause is one slice's work.
A body must be a JSON list, ``{"inputs": [...]}`` (no other key: a huge
unknown value would have to be decoded in one go), or NDJSON lines.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from .. import strictjson
from ..errors import BadRequest
import trio.lowlevel

SLICE = 500
_WS = " \t\r\n"


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_inputs")


async def decode_inputs(raw: bytes, *, ndjson: bool, slice_size: int = SLICE) -> list[Any]:
    """The inputs of a job creation body, decoded incrementally."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8: {exc}", code="bad_json") from None
    if ndjson:
        return await _lines(text, slice_size)
    return await _json_list(text, slice_size)


async def _lines(text: str, slice_size: int) -> list[Any]:
    out: list[Any] = []
    position, number = 0, 0
    while position < len(text):
        end = text.find("\n", position)
        end = len(text) if end < 0 else end
        line = text[position:end]
        position, number = end + 1, number + 1
        if line.strip():
            try:
                out.append(strictjson.loads(line))
            except ValueError as exc:
                raise BadRequest(f"line {number} is not JSON: {exc}", code="bad_json") from None
        if number % slice_size == 0:
            await trio.lowlevel.checkpoint()
    return out


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WS:
        position += 1
    return position


async def _json_list(text: str, slice_size: int) -> list[Any]:
    decoder = json.JSONDecoder()
    position = _skip(text, 0)
    if text.startswith("{", position):
        # {"inputs": [...]}: only that key, so no value has to be decoded whole.
        position = _skip(text, position + 1)
        try:
            key, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            key = None
        position = _skip(text, position)
        if key != "inputs" or not text.startswith(":", position):
            raise _bad('body must be a JSON list of inputs, {"inputs": [...]}, or NDJSON lines')
        position = _skip(text, position + 1)
        out, position = await _list_at(decoder, text, position, slice_size)
        position = _skip(text, position)
        if not text.startswith("}", position):
            raise _bad('{"inputs": [...]} may have no other key')
        position += 1
    else:
        out, position = await _list_at(decoder, text, position, slice_size)
    if _skip(text, position) != len(text):
        raise BadRequest("request body has data after the JSON value", code="bad_json")
    return out


async def _list_at(decoder: json.JSONDecoder, text: str, position: int, slice_size: int) -> tuple[list[Any], int]:
    if not text.startswith("[", position):
        raise _bad('body must be a JSON list of inputs, {"inputs": [...]}, or NDJSON lines')
    out: list[Any] = []
    position = _skip(text, position + 1)
    if text.startswith("]", position):
        return out, position + 1
    while True:
        start = position
        try:
            try:
                value, position = decoder.raw_decode(text, position)
            except RecursionError:
                raise strictjson.TooDeep() from None
            strictjson.check_text(text, value, start, position)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: input {len(out) + 1}: {exc}", code="bad_json") from None
        out.append(value)
        if len(out) % slice_size == 0:
            await trio.lowlevel.checkpoint()
        position = _skip(text, position)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
        elif text.startswith("]", position):
            return out, position + 1
        else:
            raise BadRequest(
                f"request body is not valid JSON: expected ',' or ']' at character {position}", code="bad_json"
            )
