"""Credentials to principals: API keys and JWTs (no gRPC)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tokenstream.server.auth import Authenticator, AuthSettings, ConfigurationError
from tokenstream.server.errors import Unauthenticated

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    hashed = hashlib.sha256(b"bob-key").hexdigest()
    path.write_text(
        f'[[keys]]\nuser = "alice"\nkey = "alice-key"\n\n'
        f'[[keys]]\nuser = "bob"\nkey_sha256 = "{hashed}"\n'
    )
    return path


def token(key: Any, algorithm: str = "HS256", **claims: object) -> str:
    payload = {"sub": "carol", "iss": "issuer", "aud": "tokenstream", "exp": time.time() + 60}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm)


def test_api_keys_plain_and_hashed(tmp_path: Path) -> None:
    auth = Authenticator(AuthSettings(api_keys_file=keys_file(tmp_path)))
    assert auth.authenticate("Bearer alice-key").user_id == "alice"
    assert auth.authenticate("bearer bob-key").user_id == "bob"
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate("Bearer mallory-key")
    assert info.value.reason == "INVALID_CREDENTIALS"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "MISSING_CREDENTIALS"),
        ("", "MISSING_CREDENTIALS"),
        ("Basic abc", "MALFORMED_CREDENTIALS"),
    ],
)
def test_missing_or_malformed_header(tmp_path: Path, header: str | None, reason: str) -> None:
    auth = Authenticator(AuthSettings(api_keys_file=keys_file(tmp_path)))
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate(header)
    assert info.value.reason == reason


def test_hs256_jwt_with_issuer_and_audience() -> None:
    auth = Authenticator(
        AuthSettings(jwt_hs256_secret=SECRET, jwt_issuer="issuer", jwt_audience="tokenstream")
    )
    principal = auth.authenticate(f"Bearer {token(SECRET)}")
    assert (principal.user_id, principal.method) == ("carol", "jwt")
    for bad in (
        token(SECRET, exp=time.time() - 10),
        token(SECRET, iss="someone-else"),
        token(SECRET, aud="another-service"),
        token("wrong-secret-wrong-secret-wrong-secret"),
    ):
        with pytest.raises(Unauthenticated):
            auth.authenticate(f"Bearer {bad}")
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate(f"Bearer {token(SECRET, exp=time.time() - 10)}")
    assert info.value.reason == "EXPIRED_CREDENTIALS"


def test_rs256_jwt(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "public.pem"
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    auth = Authenticator(AuthSettings(jwt_rs256_public_key_file=public, jwt_audience="tokenstream"))
    assert auth.authenticate(f"Bearer {token(private, 'RS256')}").user_id == "carol"
    # An HS256 token "signed" with the public key must not pass (algorithm confusion).
    forged = jwt.encode(
        {"sub": "eve", "aud": "tokenstream", "exp": time.time() + 60},
        "not-the-key-not-the-key-not-the-key!",
        algorithm="HS256",
    )
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {forged}")


def test_bad_keys_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nuser = "x"\n')
    with pytest.raises(ConfigurationError, match="needs 'key' or 'key_sha256'"):
        Authenticator(AuthSettings(api_keys_file=path))
