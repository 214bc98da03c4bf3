"""JSON request bodies of the `/api/` routes: read once, here, by one rule.

A body is a JSON object whose every string (key or value, at any depth) Postgres can store: UTF-8
text without NUL. JSON lets a body carry what no UTF-8 text holds — a lone surrogate such as
`"\\ud800"` — and NUL (`"\\u0000"`), which neither `text` nor `jsonb` takes; such a body is a 422
here, before any route reads it (it was a 500 where it reached Postgres). I-JSON (RFC 7493)
refuses lone surrogates too.
"""

from __future__ import annotations

import json
import re

from workers.web.errors import ApiError

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def storable(text: str) -> bool:
    """Whether Postgres can store `text`: no NUL, and valid UTF-8 (no lone surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _all_storable(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def json_object(raw: bytes) -> dict:
    """The body as a dict; raises a 422 ApiError naming the field (`body` for the whole)."""
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):  # UnicodeDecodeError (not UTF-8) is a ValueError
        raise ApiError(422, "invalid_request", "the body is not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object", field="body")
    for key, value in body.items():
        if not _all_storable(key) or not _all_storable(value):
            # Name the field only when it is a plain name: the key is the sender's text.
            field = key if _all_storable(key) and _FIELD_NAME.fullmatch(key) else "body"
            raise ApiError(422, "invalid_request", "the body has text that is not valid Unicode "
                                                   "(a lone surrogate) or contains NUL", field=field)
    return body
