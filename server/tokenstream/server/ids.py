"""Unguessable, prefixed identifiers for streams and conversations."""

from __future__ import annotations

import base64
import re
import secrets

from tokenstream.server.errors import InvalidArgument

STREAM_PREFIX = "strm_"
CONVERSATION_PREFIX = "conv_"
_BODY = r"[a-z2-7]{26}"
_STREAM_RE = re.compile(rf"{STREAM_PREFIX}{_BODY}")
_CONVERSATION_RE = re.compile(rf"{CONVERSATION_PREFIX}{_BODY}")
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")


def _random_body() -> str:
    # 128 random bits in lowercase base32: URL- and shell-safe, 26 characters.
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def new_stream_id() -> str:
    return STREAM_PREFIX + _random_body()


def new_conversation_id() -> str:
    return CONVERSATION_PREFIX + _random_body()


def check_stream_id(value: str, field: str = "stream_id") -> str:
    if not _STREAM_RE.fullmatch(value):
        shown = repr(value) if value else "empty"
        raise InvalidArgument(
            f"{field} is {shown}, which is not a stream id: stream ids look like "
            f"'{STREAM_PREFIX}' followed by 26 characters, as returned by SubmitPrompt",
            reason="MALFORMED_STREAM_ID",
            field=field,
        )
    return value


def check_conversation_id(value: str, field: str = "conversation_id") -> str:
    if not _CONVERSATION_RE.fullmatch(value):
        shown = repr(value) if value else "empty"
        raise InvalidArgument(
            f"{field} is {shown}, which is not a conversation id: conversation ids look like "
            f"'{CONVERSATION_PREFIX}' followed by 26 characters, as returned by SubmitPrompt",
            reason="MALFORMED_CONVERSATION_ID",
            field=field,
        )
    return value


def check_request_id(value: str) -> str:
    if not _REQUEST_ID_RE.fullmatch(value):
        raise InvalidArgument(
            "request_id must be 1-128 printable ASCII characters without spaces "
            "(a UUID is a good choice)",
            reason="MALFORMED_REQUEST_ID",
            field="request_id",
        )
    return value


def check_user_id(value: str, field: str = "user_id") -> str:
    if not value or len(value) > 200 or not value.isprintable():
        raise InvalidArgument(
            f"{field} must be 1-200 printable characters", reason="INVALID_USER_ID", field=field
        )
    return value
