"""RFC 8785 canonical JSON: the one function whose bytes get hashed and signed."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from toolplane.canonical import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    canonical_json,
    check_json_value,
    digest,
    parse_json_strict,
)
from toolplane.errors import CanonicalJSONError, ToolplaneError

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.floats(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER, allow_nan=False)
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=25,
)
PROPERTY = settings(deadline=None, max_examples=150)


def utf16_key(key: str) -> bytes:
    """RFC 8785 sorts object keys by their UTF-16 code units (big-endian bytes sort the same)."""
    return key.encode("utf-16-be")


# -- determinism and order ----------------------------------------------------------


@PROPERTY
@given(json_values)
def test_canonical_json_is_deterministic(value):
    assert canonical_json(value) == canonical_json(value)


@PROPERTY
@given(json_values)
def test_parse_then_reencode_gives_the_same_bytes(value):
    encoded = canonical_json(value)
    reparsed = parse_json_strict(encoded)
    assert canonical_json(reparsed) == encoded
    assert canonical_json(json.loads(encoded)) == encoded


@PROPERTY
@given(st.dictionaries(st.text(), scalars, min_size=2, max_size=12), st.data())
def test_key_order_does_not_matter(mapping, data):
    items = data.draw(st.permutations(list(mapping.items())))
    shuffled = dict(items)
    assert list(shuffled) == [k for k, _ in items]
    assert canonical_json(shuffled) == canonical_json(mapping)
    assert canonical_json({"outer": shuffled}) == canonical_json({"outer": mapping})


@PROPERTY
@given(st.dictionaries(st.text(), st.integers(0, 9), min_size=1, max_size=12))
def test_keys_are_sorted_by_utf16_code_units(mapping):
    keys = list(json.loads(canonical_json(mapping)))
    assert keys == sorted(mapping, key=utf16_key)


def test_astral_key_sorts_before_bmp_key_above_the_surrogates():
    # Code point order puts U+FFFF first; UTF-16 order puts U+1F600 (0xD83D...) first.
    emoji, last_bmp = "\U0001f600", "\uffff"
    assert last_bmp < emoji  # Python compares code points
    out = canonical_json({last_bmp: 2, emoji: 1})
    assert out == '{"\U0001f600":1,"\uffff":2}'.encode()
    assert list(json.loads(out)) == [emoji, last_bmp]


def test_rfc8785_sorting_vector():
    # RFC 8785, section 3.2.3.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonical_json(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_rfc8785_main_example():
    # RFC 8785, sections 3.2.2 (input) and 3.2.4 (output), without 1E30, which is beyond
    # the 2**53 that toolplane carries (see test_refuses_floats_beyond_2_53).
    source = r"""{
      "numbers": [333333333.33333329, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"""
    expected = (
        r"""{"literals":[null,true,false],"numbers":[333333333.3333333,4.5,0.002,1e-27],"""
        r""""string":"€$\u000f\nA'B\"\\\\\"/"}"""
    )
    assert canonical_json(parse_json_strict(source)) == expected.encode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, "0.1"),
        (-0.0, "0"),
        (1.0, "1"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (4.5, "4.5"),
        (-1.5e-9, "-1.5e-9"),
        (9007199254740991.0, "9007199254740991"),
        (1e15 + 0.5, "1000000000000000.5"),
    ],
)
def test_number_vectors(value, expected):
    assert canonical_json(value) == expected.encode()
    assert canonical_json([value]) == f"[{expected}]".encode()


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        # RFC 8785, appendix B: IEEE 754 bit patterns and their JCS text (those within
        # 2**53; the others are refused, see test_refuses_floats_beyond_2_53).
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),
        ("0000000000000001", "5e-324"),
        ("8000000000000001", "-5e-324"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("41b3de4355555553", "333333333.3333332"),
        ("41b3de4355555554", "333333333.33333325"),
        ("41b3de4355555555", "333333333.3333333"),
        ("41b3de4355555556", "333333333.3333334"),
        ("41b3de4355555557", "333333333.33333343"),
        ("becbf647612f3696", "-0.0000033333333333333333"),
        ("43143ff3c1cb0959", "1424953923781206.2"),
    ],
)
def test_rfc8785_appendix_b_numbers(bits, expected):
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert canonical_json(value) == expected.encode()


@pytest.mark.parametrize(
    "bits",
    [
        "7fefffffffffffff",  # 1.7976931348623157e+308
        "4340000000000000",  # 9007199254740992 (2**53)
        "c340000000000000",  # -9007199254740992
        "4430000000000000",  # 295147905179352830000
        "44b52d02c7e14af6",  # 1e+23
        "444b1ae4d6e2ef50",  # 1e+21
    ],
)
def test_refuses_floats_beyond_2_53(bits):
    # JCS writes them as integer literals (or exponents) that no consumer can carry exactly.
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    with pytest.raises(CanonicalJSONError, match=r"2\*\*53") as info:
        canonical_json({"n": [value]})
    assert info.value.path == "$.n[0]"


@PROPERTY
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_is_refused_or_parses_back(value):
    try:
        encoded = canonical_json({"x": value})
    except CanonicalJSONError:
        assert abs(value) > MAX_SAFE_INTEGER
        return
    assert canonical_json(parse_json_strict(encoded)) == encoded


def test_strings_and_literals():
    assert canonical_json('\u2028\x1f"\\/é') == '"\u2028\\u001f\\"\\\\/é"'.encode()
    assert canonical_json([None, True, False, "", [], {}]) == b'[null,true,false,"",[],{}]'
    assert canonical_json((1, 2)) == b"[1,2]"


# -- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_refuses_nan_and_infinity_at_any_depth(bad):
    with pytest.raises(CanonicalJSONError, match="NaN and infinity") as info:
        canonical_json({"a": [0, {"b": bad}]})
    assert info.value.path == "$.a[1].b"
    assert str(info.value).startswith("$.a[1].b: ")
    with pytest.raises(CanonicalJSONError):
        canonical_json(bad)


@pytest.mark.parametrize("big", [MAX_SAFE_INTEGER + 1, -(MAX_SAFE_INTEGER + 1), 2**64, -(2**100)])
def test_refuses_unsafe_integers_with_their_path(big):
    with pytest.raises(CanonicalJSONError, match=r"2\*\*53") as info:
        canonical_json({"x": {"y": [1, 2, big]}})
    assert info.value.path == "$.x.y[2]"
    with pytest.raises(CanonicalJSONError) as info:
        digest([big])
    assert info.value.path == "$[0]"


@pytest.mark.parametrize("edge", [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 0])
def test_accepts_the_largest_safe_integers(edge):
    assert canonical_json({"n": edge}) == f'{{"n":{edge}}}'.encode()


@PROPERTY
@given(st.integers(min_value=MAX_SAFE_INTEGER + 1) | st.integers(max_value=-MAX_SAFE_INTEGER - 1))
def test_refuses_every_unsafe_integer(big):
    with pytest.raises(CanonicalJSONError):
        canonical_json([{"k": big}])


@pytest.mark.parametrize("key", [1, None, 1.5, b"k", (1,), True])
def test_refuses_non_string_keys(key):
    with pytest.raises(CanonicalJSONError, match="keys must be strings") as info:
        canonical_json({"outer": {key: 1}})
    assert info.value.path == "$.outer"


@pytest.mark.parametrize("bad", [{1, 2}, b"bytes", object(), 1j])
def test_refuses_values_that_are_not_json(bad):
    with pytest.raises(CanonicalJSONError, match="not a JSON value"):
        canonical_json({"v": bad})


def nested(levels: int, leaf: object = 0, *, as_dict: bool = False) -> object:
    value = leaf
    for _ in range(levels):
        value = {"k": value} if as_dict else [value]
    return value


@pytest.mark.parametrize("as_dict", [False, True])
def test_depth_limit(as_dict):
    assert canonical_json(nested(MAX_DEPTH, as_dict=as_dict))
    with pytest.raises(CanonicalJSONError, match=f"deeper than {MAX_DEPTH}"):
        canonical_json(nested(MAX_DEPTH + 1, as_dict=as_dict))
    # Far deeper than Python's recursion limit: refused, never a RecursionError.
    with pytest.raises(CanonicalJSONError):
        canonical_json(nested(50_000, as_dict=as_dict))


def test_check_json_value_is_the_gate():
    check_json_value({"a": [1, "x", None, True, 1.5]})
    with pytest.raises(CanonicalJSONError):
        check_json_value({"a": math.nan})


# -- digest ------------------------------------------------------------------------


@PROPERTY
@given(json_values)
def test_digest_is_sha256_of_canonical_bytes(value):
    expected = hashlib.sha256(canonical_json(value)).hexdigest()
    assert digest(value) == expected
    assert len(expected) == 64


def test_digest_ignores_key_order_but_not_values():
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert digest({"a": 1}) != digest({"a": "1"})


# -- strict parsing ----------------------------------------------------------------


def test_canonical_json_error_is_a_value_error():
    assert issubclass(CanonicalJSONError, ValueError)
    assert issubclass(CanonicalJSONError, ToolplaneError)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1, "a": 2}', '{"a": 1, "a": 1}', '[{"x": {"k": 1, "k": null}}]'],
)
def test_parse_refuses_duplicate_keys(text):
    with pytest.raises(CanonicalJSONError, match="duplicate key") as info:
        parse_json_strict(text)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": [NaN]}', "1e400"])
def test_parse_refuses_nan_and_infinity(text):
    with pytest.raises(CanonicalJSONError):
        parse_json_strict(text)


@pytest.mark.parametrize(
    "text", ["9007199254740992", "-9007199254740992", '{"a": [18446744073709551616]}']
)
def test_parse_refuses_unsafe_integers(text):
    with pytest.raises(CanonicalJSONError, match=r"2\*\*53"):
        parse_json_strict(text)


@pytest.mark.parametrize(
    "text",
    ["", "{", "[1,]", "{'a': 1}", "tru", "01", '{"a" 1}', "[1] [2]", b'{"a":', '"\\x"'],
)
def test_parse_refuses_invalid_json(text):
    with pytest.raises(CanonicalJSONError, match="not valid JSON") as info:
        parse_json_strict(text)
    assert isinstance(info.value, ValueError)


def test_parse_accepts_str_and_bytes():
    assert parse_json_strict('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert parse_json_strict(b'{"a": true}') == {"a": True}
    assert parse_json_strict(str(MAX_SAFE_INTEGER)) == MAX_SAFE_INTEGER


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": "\xff"}',  # not UTF-8
        "1" * 5000,  # an integer literal longer than int() accepts
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's recursion
        "[" * 100,  # deeper than MAX_DEPTH and unterminated
    ],
    ids=["invalid-utf8", "5000-digits", "100000-deep", "unterminated-deep"],
)
def test_parse_turns_every_failure_into_a_canonical_error(data):
    with pytest.raises(CanonicalJSONError) as info:
        parse_json_strict(data)
    assert isinstance(info.value, ValueError)


def test_parse_refuses_nesting_beyond_the_depth_limit():
    assert parse_json_strict("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    with pytest.raises(CanonicalJSONError, match=f"deeper than {MAX_DEPTH}"):
        parse_json_strict("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2))


# -- the fast path (Python's encoder for simple values) equals the reference encoder --

_simple_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_simple = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | _simple_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(_simple_text, children, max_size=5)
    ),
    max_leaves=30,
)


@given(_simple)
def test_fast_path_is_byte_identical_to_rfc8785(value):
    assert canonical_json(value) == rfc8785.dumps(value)


def test_fast_path_is_not_taken_for_astral_keys():
    value = {"\U0001f600": 1, "\uffff": 2}
    assert canonical_json(value) == rfc8785.dumps(value)
    assert (
        canonical_json(value)
        != json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
