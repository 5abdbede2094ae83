"""JSON from clients as Python values, refusing strings that UTF-8 cannot carry.

JSON's ``\\uXXXX`` escape can name one half of a surrogate pair alone
(``"\\ud800"``). That is valid JSON text, and Python's ``json`` decodes it to
a lone surrogate: a ``str`` that cannot be encoded to UTF-8. Nothing fails
at the parser; it fails later, far from it, wherever the text is encoded:
an LMDB key, a stored job, a signature, the response body. A worker's
heartbeat or result holding one answered 500, and a job creation body
failed the whole batch the same way. RFC 8259 leaves such a string's
meaning undefined, and most other decoders refuse it; so does this one,
as the parser's own :class:`ValueError`, which every caller already turns
into a 400 naming the body.

The check costs nothing on bodies without a surrogate escape (one regular
expression search, in C). A body with one, even a valid pair such as an
escaped emoji, is encoded once to find out.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")
_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")

__all__ = ["LoneSurrogate", "check_value", "has_surrogate_escape", "loads"]


class LoneSurrogate(ValueError):
    """A JSON string escapes half a surrogate pair alone: no character, so not text."""

    def __init__(self) -> None:
        super().__init__("a string escapes half a UTF-16 surrogate pair alone (\\ud800-\\udfff), which is no character")


def loads(data: bytes | str) -> Any:
    """``json.loads``, raising :class:`LoneSurrogate` (a ``ValueError``) for a lone surrogate."""
    value = json.loads(data)
    if has_surrogate_escape(data):
        check_value(value)
    return value


def has_surrogate_escape(data: bytes | str) -> bool:
    """Whether ``data`` may hold a surrogate escape; only then need its values be checked."""
    found = _ESCAPE_TEXT.search(data) if isinstance(data, str) else _ESCAPE_BYTES.search(data)
    return found is not None


def check_value(value: Any) -> None:
    """Raise :class:`LoneSurrogate` if a string in ``value`` (a decoded JSON value) is a lone surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LoneSurrogate() from None
