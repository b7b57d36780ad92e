"""The API's line splitter gives the lines a file of the same bytes gives, whatever the
chunks the body arrives in."""

from __future__ import annotations

import io
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import errors
from worker.api.upload import split_lines


def file_lines(content: bytes) -> list[bytes]:
    """What iterating over a file of `content` yields, without the line ends."""
    return [line.removesuffix(b"\n") for line in io.BytesIO(content)]


@given(
    content=st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20),
)
def test_lines_match_a_files_whatever_the_chunks(content: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(content), *(c for c in cuts if c <= len(content))})
    chunks = [content[a:b] for a, b in itertools.pairwise(bounds)]
    assert list(split_lines(chunks)) == file_lines(content)


def test_a_line_over_the_cap_is_refused_naming_it() -> None:
    chunks = [b'"first"\n"sec', b"x" * 50, b"x" * 50]
    with pytest.raises(errors.InputError) as caught:
        list(split_lines(chunks, max_line_bytes=64))
    assert caught.value.line == 2
    assert "64 bytes" in str(caught.value)
