"""Job sources for ``ocf jobs create``: lazy, so millions of inputs never sit in memory.

* :func:`brace_expand` — ``shard-{00000..99999}.tar``, ``{en,de}/part-{1..3}``
  (numeric ranges keep the zero padding of their bounds; ranges may step,
  ``{0..100..10}``; several groups multiply);
* :func:`numeric_range` — ``0:1000000`` (half open) or ``0..999999`` (inclusive);
* :func:`file_lines` — one input per non-empty line (as a string, or parsed as JSON);
* :func:`json_list` — the elements of one big JSON list, decoded incrementally.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any
from collections.abc import Iterator

from ..errors import ValidationError

_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
_ALPHA_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])$")


def _alternatives(body: str) -> Iterator[str] | None:
    """The values of one ``{...}`` group, lazily; ``None`` if it is not a brace group (kept literally)."""
    match = _RANGE.match(body)
    if match:
        lo_text, hi_text, step_text = match.groups()
        lo, hi = int(lo_text), int(hi_text)
        step = int(step_text) if step_text else 1
        if step == 0:
            raise ValidationError(f"brace range {{{body}}} has a zero step")
        # As bash: a bound written with a leading zero ("007") pads every value to the widest bound.
        bounds = (lo_text.lstrip("-"), hi_text.lstrip("-"))
        padded = any(len(b) > 1 and b.startswith("0") for b in bounds)
        width = max(len(lo_text), len(hi_text)) if padded else 0
        direction = 1 if hi >= lo else -1
        return (f"{n:0{width}d}" if width else str(n) for n in range(lo, hi + direction, step * direction))
    match = _ALPHA_RANGE.match(body)
    if match:
        lo, hi = ord(match.group(1)), ord(match.group(2))
        direction = 1 if hi >= lo else -1
        return (chr(c) for c in range(lo, hi + direction, direction))
    if "," in body:
        return iter(body.split(","))
    return None


def check_pattern(pattern: str) -> None:
    """Refuse a pattern that is almost certainly a typo, before creating a single job.

    Bash keeps an unbalanced ``{`` literally, so ``'x-{1..3'`` would create one
    job named ``x-{1..3``; an operator who typed it meant three. Likewise a
    group that tries to be a range (``{1...3}``, ``{a..}``) but is not one.
    """
    depth, opened = 0, -1
    for position, char in enumerate(pattern):
        if char == "{":
            depth, opened = depth + 1, position if depth == 0 else opened
        elif char == "}":
            if depth == 0:
                raise ValidationError(f"pattern {pattern!r} has a '}}' without a '{{' (at character {position + 1})")
            depth -= 1
    if depth:
        raise ValidationError(f"pattern {pattern!r} has a '{{' that is never closed (at character {opened + 1})")
    for match in _GROUP.finditer(pattern):
        body = match.group(1)
        if ".." in body and not _RANGE.match(body) and not _ALPHA_RANGE.match(body) and "," not in body:
            raise ValidationError(
                f"pattern {pattern!r}: {{{body}}} is not a range; write {{1..3}}, {{01..10}}, {{0..100..10}} or "
                f"{{a..z}}"
            )


def brace_expand(pattern: str) -> Iterator[str]:
    """Expand shell-style brace groups left to right, yielding one string at a time."""
    check_pattern(pattern)
    return _expand(pattern)


def _expand(pattern: str) -> Iterator[str]:
    match = _GROUP.search(pattern)
    while match is not None and _alternatives(match.group(1)) is None:
        match = _GROUP.search(pattern, match.end())
    if match is None:
        yield pattern
        return
    head, tail = pattern[: match.start()], pattern[match.end() :]
    values = _alternatives(match.group(1))
    assert values is not None
    for value in values:
        for rest in _expand(tail):
            yield head + value + rest


def count_brace(pattern: str) -> int:
    """How many strings :func:`brace_expand` yields, without generating them."""
    check_pattern(pattern)
    total = 1
    for match in _GROUP.finditer(pattern):
        body = match.group(1)
        range_match = _RANGE.match(body)
        if range_match:
            lo, hi = int(range_match.group(1)), int(range_match.group(2))
            step = int(range_match.group(3) or 1)
            total *= abs(hi - lo) // step + 1
        elif _ALPHA_RANGE.match(body):
            total *= abs(ord(body[0]) - ord(body[-1])) + 1
        elif "," in body:
            total *= len(body.split(","))
    return total


def numeric_range(spec: str) -> range:
    """``A:B`` (B excluded, like Python) or ``A..B`` (B included); an optional ``:STEP``."""
    match = re.match(r"^(-?\d+)(:|\.\.)(-?\d+)(?::(\d+))?$", spec.strip())
    if not match:
        raise ValidationError(f"range {spec!r} must look like 0:1000 (end excluded) or 0..999 (end included)")
    lo, sep, hi, step = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4) or 1)
    if step == 0:
        raise ValidationError(f"range {spec!r} has a zero step")
    return range(lo, hi + (1 if sep == ".." else 0), step)


def file_lines(stream: IO[str], *, as_json: bool = False) -> Iterator[Any]:
    for number, line in enumerate(stream, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if as_json:
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ValidationError(f"line {number} is not JSON: {exc}") from None
        else:
            yield line


def json_list(stream: IO[str], *, chunk_size: int = 1 << 16) -> Iterator[Any]:
    """Elements of a top-level JSON list, decoded as the text arrives (memory: one element + one chunk)."""
    decoder = json.JSONDecoder()
    buffer = ""
    position = 0
    started = False
    expect_value = True
    eof = False

    def more() -> bool:
        nonlocal buffer, position, eof
        chunk = stream.read(chunk_size)
        if not chunk:
            eof = True
            return False
        buffer = buffer[position:] + chunk
        position = 0
        return True

    while True:
        while position < len(buffer) and buffer[position] in " \t\r\n":
            position += 1
        if position >= len(buffer):
            if eof or not more():
                raise ValidationError(
                    "JSON list ends early (missing ']')" if started else "input is empty, expected a JSON list"
                )
            continue
        char = buffer[position]
        if not started:
            if char != "[":
                raise ValidationError("input must be a JSON list ('[' ... ']')")
            started = True
            position += 1
            continue
        if char == "]":
            return
        if char == "," and not expect_value:
            expect_value = True
            position += 1
            continue
        if not expect_value:
            raise ValidationError(f"expected ',' or ']' in the JSON list, found {char!r}")
        try:
            value, end = decoder.raw_decode(buffer, position)
        except ValueError as exc:
            if not eof and more():
                continue  # the element is cut by the chunk boundary
            raise ValidationError(f"bad JSON list element: {exc}") from None
        # A number cut by the chunk boundary ("1" of "12", "0" of "0.5") decodes early: read on.
        if (
            not eof
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (end == len(buffer) or buffer[end] in _NUMBER_CHARS)
            and more()
        ):
            continue
        yield value
        position = end
        expect_value = False
