"""JWT bearer authentication (PyJWT) and the roles it carries.

Tokens are HS256 with ``shim.jwt_secret``; when ``shim.jwt_public_key`` is
configured, only the algorithms of that key's family are accepted (RS*/PS*
for RSA, ES* for EC, EdDSA for Ed25519) and the HMAC secret is not used at
all, so a token signed with a leaked or default secret cannot pass.  ``exp`` and ``sub`` are
required; ``iss``/``aud`` are checked when configured.  ``roles`` lists
``user`` and/or ``admin`` (unknown roles are ignored; none means ``user``).
Every failure is the same 401 to the caller; the reason goes to the log only.

A token that verified is remembered (up to :data:`CACHE_SIZE` of them) until
its ``exp``: clients send the same token with every request, and checking
its signature again each time was a tenth of a POST's CPU.  Keys come from
the settings, read once at start, so a remembered token can never outlive
the key that signed it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from worker.settings import ShimSettings
from worker.shim.errors import ApiError

log = structlog.get_logger("worker.shim.auth")

ROLES = ("user", "admin")
#: longest token accepted; a larger header is rejected before any crypto
MAX_TOKEN_CHARS = 8192
#: clock skew tolerated on exp/iat/nbf (seconds)
LEEWAY_SECONDS = 10
#: verified tokens remembered per process (the oldest half is dropped when full)
CACHE_SIZE = 10_000
#: user ids are tokens (the same rule as ``user_id`` in request bodies)
_SUBJECT = re.compile(r"[A-Za-z0-9._@:|+-]{1,200}")


def _family(key: Any) -> tuple[str, ...]:
    """The JWS algorithms of a public key's family."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ("ES256", "ES384", "ES512")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ("EdDSA",)
    raise ValueError(f"shim.jwt_public_key: unsupported key type {type(key).__name__}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject and roles."""

    user_id: str
    roles: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.user_id


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


class Authenticator:
    """Verifies bearer tokens against the configured keys."""

    def __init__(self, cfg: ShimSettings) -> None:
        self._keys: dict[str, Any] = {}
        if cfg.jwt_public_key.strip():
            key = serialization.load_pem_public_key(cfg.jwt_public_key.strip().encode())
            self._keys = dict.fromkeys(_family(key), key)
        elif cfg.jwt_secret.get_secret_value():  # an empty HMAC key would let anyone sign
            self._keys["HS256"] = cfg.jwt_secret.get_secret_value()
        self._issuer = cfg.jwt_issuer or None
        self._audience = cfg.jwt_audience or None
        #: token → (caller, exp) of tokens that verified
        self._verified: dict[str, tuple[Principal, float]] = {}

    def principal(self, authorization: str | None) -> Principal:
        """The caller of a request with this ``Authorization`` header, or a 401 ApiError."""
        if not authorization:
            raise unauthorized("a bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise unauthorized("a bearer token is required")
        known = self._verified.get(token)
        if known is not None:
            if time.time() <= known[1] + LEEWAY_SECONDS:
                return known[0]
            del self._verified[token]
        principal, exp = self._verify(token)
        if len(self._verified) >= CACHE_SIZE:
            for old in list(self._verified)[: CACHE_SIZE // 2]:  # dicts keep insertion order
                del self._verified[old]
        self._verified[token] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(str(alg))
            if key is None:
                raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} not accepted")
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("the token has expired") from None
        except jwt.PyJWTError as exc:
            log.info("token rejected", reason=type(exc).__name__)
            raise unauthorized("the token is not valid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _SUBJECT.fullmatch(sub):  # match() with $ let "bob\n" pass as bob
            raise unauthorized("the token has no valid subject")
        raw = claims.get("roles") or ["user"]
        roles = tuple(r for r in (raw if isinstance(raw, list) else [raw]) if r in ROLES) or ("user",)
        return Principal(sub, roles), float(claims["exp"])


def issue_token(cfg: ShimSettings, user: str, role: str, ttl_seconds: int = 3600) -> str:
    """A development HS256 token for ``user`` with ``role`` (signed with the configured secret)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "roles": [role], "iat": now, "exp": now + ttl_seconds}
    if cfg.jwt_issuer:
        claims["iss"] = cfg.jwt_issuer
    if cfg.jwt_audience:
        claims["aud"] = cfg.jwt_audience
    return jwt.encode(claims, cfg.jwt_secret.get_secret_value(), algorithm="HS256")
