"""JSON that refuses duplicate object keys.

The standard parser keeps the last of two equal keys, so a body with
``"quantity": 1, "quantity": 9999`` reads as 9999 here while a filter or
log line upstream that keeps the first saw 1.  Every JSON body that carries
an order (HTTP requests, AMQP commands) is read with :func:`loads_no_duplicates`,
which refuses such a body instead of guessing which value was meant.

The check runs in jiter (pydantic's own JSON parser, in Rust), which refuses a
repeated key by itself: 1.6 µs of CPU for a PlaceOrder's body where the
standard parser with a Python hook per object took 6.3
(``scripts/bench_json_check.py``).  Only a body jiter does not take
(a repeated key, malformed JSON, nesting beyond its 200 levels, escapes it
reads more strictly) is read again by the standard parser, which decides, so
what is refused and the error that says why are as they always were.
"""

from __future__ import annotations

import json
from typing import Any

import jiter


class TooDeeplyNested(ValueError):
    """The document nests arrays and objects deeper than the parser's recursion allows.

    ``json.loads`` raises RecursionError for it (a few thousand ``[`` do), which
    nobody catching ValueError expects; here it is a ValueError like any other
    document that cannot be read.
    """

    def __init__(self) -> None:
        super().__init__("JSON nested too deeply")


class DuplicateKeyError(ValueError):
    """An object in the document names the same key twice.

    ``path`` leads from the document's root to that object (keys and list
    indexes); ``key`` is the repeated key.
    """

    def __init__(self, key: str, path: tuple[str | int, ...]) -> None:
        where = ".".join(str(p) for p in path) or "the top-level object"
        super().__init__(f"duplicate key {key!r} in {where}")
        self.key, self.path = key, path


def loads_no_duplicates(body: bytes | str) -> Any:
    """``json.loads``, except that an object with a repeated key raises :class:`DuplicateKeyError`.

    Malformed JSON raises :class:`json.JSONDecodeError` as usual, and JSON
    nested beyond the parser's recursion :class:`TooDeeplyNested`; all are
    ``ValueError``.
    """
    try:
        return jiter.from_json(body.encode() if isinstance(body, str) else body, catch_duplicate_keys=True)
    except ValueError:
        return _loads_no_duplicates(body)  # the standard parser decides, and says why


def _loads_no_duplicates(body: bytes | str) -> Any:
    """:func:`loads_no_duplicates` with the standard parser: a Python hook on every object."""
    repeated: list[tuple[dict[str, Any], str]] = []

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and not repeated:
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            repeated.append((obj, key))
        return obj

    try:
        document = json.loads(body, object_pairs_hook=pairs_to_dict)
        if repeated:
            obj, key = repeated[0]
            raise DuplicateKeyError(key, _path_to(document, obj) or ())
    except RecursionError:
        raise TooDeeplyNested() from None
    return document


def _path_to(node: Any, target: dict[str, Any], path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where ``target`` (by identity) sits in ``node``; parsing already finished, so only refusals pay for this."""
    if node is target:
        return path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for step, child in children:
        found = _path_to(child, target, (*path, step))
        if found is not None:
            return found
    return None
