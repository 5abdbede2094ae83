"""JSON from clients: a lone surrogate escape is refused at the parser, everything else decodes as ``json``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocf import strictjson

# st.text() never draws a surrogate: these are the values any honest JSON encoder can produce.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values, st.booleans())
def test_any_honest_value_decodes_exactly(value, ascii_only):
    """Escaped (astral characters as surrogate *pairs*) or not, every honest body is taken as json takes it."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert strictjson.loads(text) == json.loads(text)
    assert strictjson.loads(text.encode()) == json.loads(text)


@given(values, st.text(max_size=3), st.integers(0xD800, 0xDFFF), st.text(max_size=3), st.integers(0, 2))
def test_a_lone_surrogate_anywhere_is_refused_as_a_value_error(value, before, code, after, where):
    lone = before + chr(code) + after
    hostile = [[value, lone], {"k": value, lone: 1}, {"x": [value, {"y": lone}]}][where]
    text = json.dumps(hostile)  # ensure_ascii: the lone surrogate goes out as a \udXXX escape, as a client sends it
    decoded = json.loads(text)  # what Python's json accepts...
    with pytest.raises(UnicodeEncodeError):
        json.dumps(decoded, ensure_ascii=False).encode()  # ...and fails on later, far from the parser
    with pytest.raises(strictjson.LoneSurrogate):
        strictjson.loads(text)
    with pytest.raises(ValueError):
        strictjson.loads(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        r'"\ud800"',
        r'"\uDFFF"',
        r'{"\udc00": 1}',
        r'["\ud83d"]',  # a high half without its low half
        r'["\ude00\ud83d"]',  # the halves the wrong way round
        r'{"a": [{"b": "x\udbffy"}]}',
    ],
)
def test_lone_surrogates_are_refused(text):
    with pytest.raises(strictjson.LoneSurrogate):
        strictjson.loads(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (r'"\ud83d\ude00"', "\U0001f600"),  # a pair is a character
        (r'"\\ud800"', "\\ud800"),  # an escaped backslash: the six characters, not a surrogate
        ('"\U0001f600"', "\U0001f600"),
    ],
)
def test_pairs_and_look_alikes_are_taken(text, value):
    assert strictjson.loads(text) == value


@pytest.mark.parametrize("depth", [strictjson.MAX_DEPTH + 1, 990, 200_000])
def test_nesting_deeper_than_the_limit_is_refused_as_a_value_error(depth):
    """Deeper than Python's parser goes (a RecursionError, no ValueError: a 500 on every route), or just
    under it (parsed, then not encodable a few frames deeper): refused either way, at the parser."""
    text = "[" * depth + "]" * depth
    with pytest.raises(strictjson.TooDeep):
        strictjson.loads(text)
    with pytest.raises(ValueError):
        strictjson.loads('{"a": ' + text.replace("[", '{"k":[', 1).replace("]", "]}", 1) + "}")


def test_nesting_up_to_the_limit_is_taken():
    deepest = "[" * strictjson.MAX_DEPTH + "]" * strictjson.MAX_DEPTH
    assert strictjson.loads(deepest) is not None
    many = json.dumps([[1]] * 10_000)  # many brackets, shallow: walked, taken
    assert len(strictjson.loads(many)) == 10_000


def test_check_text_looks_only_at_its_slice():
    lone, ok = '"\\ud800"', '"ok"'
    text = lone + " " + ok
    strictjson.check_text(text, "ok", len(lone) + 1, len(text))  # the escape lies outside the slice
    with pytest.raises(strictjson.LoneSurrogate):
        strictjson.check_text(text, json.loads(lone), 0, len(lone))


@given(st.text(max_size=6), st.integers(0xD800, 0xDFFF), st.text(max_size=6))
def test_encodable_tells_a_lone_surrogate_from_text(before, code, after):
    """The per-string check peers' items use (one bad item costs only itself) agrees with UTF-8."""
    assert strictjson.encodable(before + after)
    assert not strictjson.encodable(before + chr(code) + after)
