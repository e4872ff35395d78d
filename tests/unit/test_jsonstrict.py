"""Duplicate JSON keys are refused, naming the key and where its object sits."""

from __future__ import annotations

import json

import pytest

from schema.jsonstrict import DuplicateKeyError, loads_no_duplicates


@pytest.mark.parametrize(
    ("body", "key", "path"),
    [
        (b'{"quantity": 1, "quantity": 9999}', "quantity", ()),
        (
            b'{"items": [{"product_id": "a", "quantity": 1}, {"quantity": 1, "quantity": 9999}]}',
            "quantity",
            ("items", 1),
        ),
        (b'{"payment": {"provider": "stripe", "provider": "paypal"}}', "provider", ("payment",)),
        (b'[{"a": {"b": 1, "b": 1}}]', "b", (0, "a")),  # the same value twice is still two keys
    ],
)
def test_a_repeated_key_is_refused_naming_the_key_and_the_path_to_its_object(body, key, path):
    with pytest.raises(DuplicateKeyError) as refused:
        loads_no_duplicates(body)
    assert (refused.value.key, refused.value.path) == (key, path)
    assert isinstance(refused.value, ValueError) and repr(key) in str(refused.value)


def test_documents_without_repeated_keys_read_as_json_loads_reads_them():
    body = '{"items": [{"product_id": "a", "quantity": 2}], "note": null, "n": [1, 2.5, "x"]}'
    assert loads_no_duplicates(body.encode()) == json.loads(body)


def test_malformed_json_still_raises_json_decode_error():
    with pytest.raises(json.JSONDecodeError):
        loads_no_duplicates(b'{"quantity": 1')


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "\\u0061": 2}',  # the same key, one spelled as an escape
        b'{"lines": [{"q": 1}, {"q": 2}], "x": {"y": {"z": 1, "z": 2}}}',  # deep in an array's object
        '{"note": "caf\u00e9", "note": "tea"}'.encode(),
    ],
)
def test_a_repeated_key_is_refused_however_it_is_spelled_or_wherever_it_sits(body):
    with pytest.raises(DuplicateKeyError):
        loads_no_duplicates(body)
    with pytest.raises(DuplicateKeyError):
        loads_no_duplicates(body.decode())  # the shim reads str


@pytest.mark.parametrize(
    "body",
    [
        "[" * 500 + "]" * 500,  # deeper than the fast parser goes (200), within the standard parser's reach
        '{"a": "\\ud800"}',  # a lone surrogate escape, which the standard parser takes
        '{"a": NaN, "b": -Infinity, "c": 1e999, "d": 123456789012345678901234567890}',
        '  {"a": [1, 2.5, null, true, "x"]}\n',
    ],
)
def test_what_the_standard_parser_takes_is_taken_and_read_the_same(body):
    expected = json.loads(body)
    got = loads_no_duplicates(body.encode())
    assert json.dumps(got) == json.dumps(expected)  # NaN != NaN: compare the documents as written back


def test_a_body_in_utf_16_is_still_read_as_the_standard_parser_reads_it():
    body = '{"a": 1}'.encode("utf-16")
    assert loads_no_duplicates(body) == {"a": 1}


def test_too_deep_and_malformed_bodies_still_raise_what_they_raised():
    from schema.jsonstrict import TooDeeplyNested

    with pytest.raises(TooDeeplyNested):
        loads_no_duplicates(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(json.JSONDecodeError) as bad:
        loads_no_duplicates(b'{"quantity": 1} x')
    assert (bad.value.msg, bad.value.lineno, bad.value.colno) == ("Extra data", 1, 17)
