"""Job sources: brace expansion, ranges, lines, streamed JSON lists."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocf.errors import ValidationError
from ocf.jobs.creator import brace_expand, count_brace, file_lines, json_list, numeric_range


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("shard-{00..03}.tar", ["shard-00.tar", "shard-01.tar", "shard-02.tar", "shard-03.tar"]),
        ("{en,de}/{1..2}", ["en/1", "en/2", "de/1", "de/2"]),
        ("x{3..1}", ["x3", "x2", "x1"]),
        ("x{0..10..5}", ["x0", "x5", "x10"]),
        ("{a..c}", ["a", "b", "c"]),
        ("plain", ["plain"]),
        ("keep{this}literal{1..2}", ["keep{this}literal1", "keep{this}literal2"]),
        ("{-1..1}", ["-1", "0", "1"]),
    ],
)
def test_brace_expand(pattern, expected):
    assert list(brace_expand(pattern)) == expected
    assert count_brace(pattern) == len(expected)


def test_brace_expand_is_lazy():
    # 10^10 strings: only the first few are ever built
    first = list(itertools.islice(brace_expand("s{00000..99999}-{00000..99999}"), 3))
    assert first == ["s00000-00000", "s00000-00001", "s00000-00002"]
    assert count_brace("s{00000..99999}-{00000..99999}") == 10**10


def test_numeric_range():
    assert list(numeric_range("0:3")) == [0, 1, 2]
    assert list(numeric_range("0..3")) == [0, 1, 2, 3]
    assert list(numeric_range("0:10:4")) == [0, 4, 8]
    assert len(numeric_range("0:1000000")) == 1_000_000
    for bad in ("1-2", "a:b", "0:10:0", ""):
        with pytest.raises(ValidationError):
            numeric_range(bad)


def test_file_lines():
    assert list(file_lines(io.StringIO("a\n\nb\r\n"))) == ["a", "b"]
    assert list(file_lines(io.StringIO('{"x": 1}\n2\n'), as_json=True)) == [{"x": 1}, 2]
    with pytest.raises(ValidationError, match="line 2"):
        list(file_lines(io.StringIO("1\n{bad\n"), as_json=True))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(json_values, max_size=20), st.integers(min_value=1, max_value=64), st.sampled_from([None, 0, 2]))
def test_json_list_streams_any_list_at_any_chunk_size(values, chunk, indent):
    text = json.dumps(values, indent=indent)
    assert list(json_list(io.StringIO(text), chunk_size=chunk)) == values


@pytest.mark.parametrize("text", ["", "{}", "[1 2]", "[1,", "[1, {]", '["unterminated]'])
def test_json_list_rejects_malformed_input(text):
    with pytest.raises(ValidationError):
        list(json_list(io.StringIO(text), chunk_size=2))


@pytest.mark.parametrize("pattern", ["x-{1..3", "x-1..3}", "x-{1...3}", "{a..}", "{{1..2}"])
def test_mistyped_patterns_are_refused_with_a_clear_error(pattern):
    with pytest.raises(ValidationError, match="pattern"):
        list(brace_expand(pattern))
    with pytest.raises(ValidationError, match="pattern"):
        count_brace(pattern)
