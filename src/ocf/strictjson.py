"""JSON from clients as Python values: refusing strings UTF-8 cannot carry, and nesting Python cannot.

Two kinds of valid JSON text used to pass Python's ``json`` parser, or
break it, and fail later as a 500:

* **A lone surrogate.** JSON's ``\\uXXXX`` escape can name one half of a
  surrogate pair alone (``"\\ud800"``). ``json`` decodes it to a ``str``
  that cannot be encoded to UTF-8, so it failed wherever the text was
  encoded: an LMDB key, a stored job, the response body. A worker's
  heartbeat or result holding one answered 500, and so did job creation.
  RFC 8259 leaves such a string's meaning undefined, and most decoders
  refuse it.
* **Deep nesting.** ``[[[[...]]]]`` a few thousand deep makes ``json``
  raise :class:`RecursionError`, which is no ``ValueError``, so every
  route answered 500. A value just under Python's limit parsed, then
  failed when stored, a few frames deeper. :data:`MAX_DEPTH` is far below
  that limit and far above what any job or entry needs.

Both are refused as the parser's own :class:`ValueError`, which every
caller already turns into a 400 naming the body. The checks cost nothing
on ordinary bodies: one search for a surrogate escape and a count of
brackets, in C; a value is walked only when its text could break a rule.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest nesting of lists and objects taken (Python's own parser gives up near 1,000).
MAX_DEPTH = 128

_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")

__all__ = ["MAX_DEPTH", "LoneSurrogate", "TooDeep", "check_text", "encodable", "loads"]


class LoneSurrogate(ValueError):
    """A JSON string escapes half a surrogate pair alone: no character, so not text."""

    def __init__(self) -> None:
        super().__init__("a string escapes half a UTF-16 surrogate pair alone (\\ud800-\\udfff), which is no character")


class TooDeep(ValueError):
    """Lists and objects nested deeper than :data:`MAX_DEPTH`."""

    def __init__(self) -> None:
        super().__init__(f"lists and objects are nested more than {MAX_DEPTH} deep")


def loads(data: bytes | str) -> Any:
    """``json.loads``, raising :class:`LoneSurrogate` or :class:`TooDeep` (both ``ValueError``)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise TooDeep() from None
    check_text(data, value)
    return value


def check_text(data: bytes | str, value: Any, start: int = 0, end: int | None = None) -> None:
    """Raise if ``value``, decoded from ``data[start:end]``, breaks a rule; looks at ``value`` only if it may."""
    end = len(data) if end is None else end
    if isinstance(data, str):
        brackets = data.count("[", start, end) + data.count("{", start, end)
        escape = _ESCAPE_TEXT.search(data, start, end) is not None
    else:
        brackets = data.count(b"[", start, end) + data.count(b"{", start, end)
        escape = _ESCAPE_BYTES.search(data, start, end) is not None
    if brackets > MAX_DEPTH:
        _check_depth(value)
    if escape:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise LoneSurrogate() from None


def encodable(text: str) -> bool:
    """Can UTF-8 carry ``text``? For strings checked one by one (a peer's name or address), where a
    lone surrogate costs only the item that holds it, not the whole message."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > MAX_DEPTH:
            raise TooDeep()
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
