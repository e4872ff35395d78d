"""``Idempotency-Key``: the same key and body give the same order id.

Ids are derived, not stored: the order id (unless the body names one) and the
command's AMQP ``message_id`` are an HMAC-SHA256 of (kind, user, key) under
the server's ``shim.id_secret``.  Nobody without the secret can compute
another user's order id for a key and take it first (with a public uuid5
namespace anyone could, and the victim's later POST then answered 202 for an
order it could not read).  A replay therefore
publishes the very same command again, and the worker's inbox, keyed on
``message_id``, applies it once, whether or not Redis remembers the key.

Redis only remembers which body a key was first used with (a SHA-256
fingerprint, for ``idempotency_ttl_seconds``), so that reusing a key with a
different body answers 422.  When Redis is down that check is skipped, and a
replay with a different body is absorbed by the inbox as a duplicate (the
first body wins); derived ids keep the answer stable either way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from worker.redis_gate import RedisGate
from worker.shim.errors import ApiError

KEY_PREFIX = "orders:idem:"
#: visible ASCII, at most 128 characters (the message id must stay ≤ 200)
KEY_PATTERN = r"^[\x21-\x7e]{1,128}$"
_VALID_KEY = re.compile(KEY_PATTERN)


def validate_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not _VALID_KEY.fullmatch(key):
        raise ApiError(
            422, "validation_error", "header.Idempotency-Key: 1 to 128 visible ASCII characters", fields=None
        )
    return key


def derived_id(secret: bytes, kind: str, user: str, key: str) -> uuid.UUID:
    """The id of the ``kind`` command sent under ``key`` by ``user``: deterministic, and secret.

    The first 128 bits of HMAC-SHA256(secret, kind NUL user NUL key), marked
    as an RFC 9562 version 8 (custom) UUID.
    """
    digest = bytearray(hmac.new(secret, f"{kind}\x00{user}\x00{key}".encode(), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return uuid.UUID(bytes=bytes(digest))


def fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Remembers the body fingerprint each key was first used with."""

    def __init__(
        self, client: aioredis.Redis, ttl_seconds: int, gate: RedisGate | None = None, secret: str = ""
    ) -> None:
        self._secret = secret.encode()
        self._redis = client
        self._ttl = ttl_seconds
        self._gate = gate or RedisGate("idempotency keys")

    def derive(self, kind: str, user: str, key: str) -> uuid.UUID:
        """:func:`derived_id` under this shim's secret."""
        return derived_id(self._secret, kind, user, key)

    async def claim(self, kind: str, user: str, key: str, body_hash: str) -> None:
        """Record the first use of ``key``; 422 ApiError when it was used with another body.

        With Redis down the check is skipped (derived ids keep replays stable).
        """
        if not self._gate.usable():
            return
        name = f"{KEY_PREFIX}{kind}:{self.derive(kind, user, key)}"
        try:
            # SET NX GET: stores only the first use and returns what was there (Redis ≥ 7)
            previous = await self._redis.set(name, body_hash, nx=True, ex=self._ttl, get=True)
        except redis.RedisError as exc:
            self._gate.failed(exc)
            return
        self._gate.succeeded()
        if isinstance(previous, bytes) and previous.decode() != body_hash:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was already used with a different request body"
            )
