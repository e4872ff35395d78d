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
