"""Who is calling: bearer credentials (static API keys or JWTs) to a principal.

Plain Python, no gRPC: the transport's interceptor reads the `authorization` header and
asks an `Authenticator`. API keys come from a TOML file:

    [[keys]]
    user = "alice"
    key = "ts_live_..."            # or, to keep no secret on disk:
    # key_sha256 = "9f86d08..."    # hex SHA-256 of the key

JWTs are checked for signature (HS256 with a shared secret, or RS256 with a public key),
expiry, and the configured issuer and audience; the principal is the `sub` claim.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jwt

from tokenstream.server.errors import Unauthenticated

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    method: str  # "api_key", "jwt", or "development"


DEVELOPER = Principal("developer", "development")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    api_keys_file: Path | None = None
    jwt_hs256_secret: str | None = None
    jwt_rs256_public_key_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.api_keys_file or self.jwt_hs256_secret or self.jwt_rs256_public_key_file)


class ConfigurationError(ValueError):
    """The authentication settings cannot be used as given."""


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._key_hashes = _load_keys(settings.api_keys_file) if settings.api_keys_file else {}
        self._jwt_keys: list[tuple[str, str | bytes]] = []
        if settings.jwt_hs256_secret:
            self._jwt_keys.append(("HS256", settings.jwt_hs256_secret))
        if settings.jwt_rs256_public_key_file:
            self._jwt_keys.append(("RS256", settings.jwt_rs256_public_key_file.read_bytes()))
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `authorization` header value; raises Unauthenticated."""
        if not authorization:
            raise Unauthenticated(
                "no credentials: send 'authorization: Bearer <API key or JWT>'",
                reason="MISSING_CREDENTIALS",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the authorization header must be 'Bearer <API key or JWT>'",
                reason="MALFORMED_CREDENTIALS",
            )
        token = token.strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, user_id in self._key_hashes.items():
            if hmac.compare_digest(known, digest):
                return Principal(user_id, "api_key")
        if self._jwt_keys and token.count(".") == 2:
            return self._verify_jwt(token)
        raise Unauthenticated("the credentials are not valid", reason="INVALID_CREDENTIALS")

    def _verify_jwt(self, token: str) -> Principal:
        failure: jwt.PyJWTError | None = None
        for algorithm, key in self._jwt_keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    issuer=self._issuer,
                    audience=self._audience,
                    options={"require": ["exp", "sub"]},
                )
            except jwt.ExpiredSignatureError as exc:
                raise Unauthenticated(
                    "the token has expired: get a new one", reason="EXPIRED_CREDENTIALS"
                ) from exc
            except jwt.PyJWTError as exc:
                failure = exc
                continue
            return Principal(str(claims["sub"]), "jwt")
        raise Unauthenticated(
            f"the token is not valid: {failure}", reason="INVALID_CREDENTIALS"
        ) from failure


def _load_keys(path: Path) -> dict[str, str]:
    """SHA-256 hex of each key -> user id."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read API keys from {path}: {exc}") from exc
    hashes: dict[str, str] = {}
    for number, entry in enumerate(data.get("keys", []), start=1):
        user = entry.get("user")
        if not isinstance(user, str) or not user:
            raise ConfigurationError(f"{path}: key #{number} has no 'user'")
        if isinstance(entry.get("key"), str) and entry["key"]:
            digest = hashlib.sha256(entry["key"].encode()).hexdigest()
        elif isinstance(entry.get("key_sha256"), str):
            digest = entry["key_sha256"].lower()
        else:
            raise ConfigurationError(f"{path}: key #{number} needs 'key' or 'key_sha256'")
        hashes[digest] = user
    if not hashes:
        raise ConfigurationError(f"{path} defines no [[keys]]")
    return hashes
