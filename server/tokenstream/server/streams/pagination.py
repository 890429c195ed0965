"""Opaque page tokens for history: which conversation, and the last turn already returned."""

from __future__ import annotations

import base64
import binascii
import json

from tokenstream.server.errors import InvalidArgument


def encode_page_token(conversation_id: str, cursor: int) -> str:
    raw = json.dumps({"c": conversation_id, "a": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, conversation_id: str) -> int:
    """The cursor in `token`; 0 for an empty token (first page)."""
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        owner, cursor = data["c"], data["a"]
        if not isinstance(owner, str) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(token)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError) as exc:
        raise InvalidArgument(
            "page_token is not valid: pass the next_page_token of a previous GetHistory "
            "response unchanged, or leave it empty for the first page",
            reason="INVALID_PAGE_TOKEN",
            field="page_token",
        ) from exc
    if owner != conversation_id:
        raise InvalidArgument(
            "page_token belongs to a different conversation: use it only with the "
            "conversation_id of the request that returned it",
            reason="INVALID_PAGE_TOKEN",
            field="page_token",
        )
    return cursor
