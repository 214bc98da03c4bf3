"""LiveKit webhooks, the pure part: verify the signature, parse the event, list its arguments.

No I/O here: `workers/web/webhook.py` feeds requests in, `orchestration/adapters/redis_enqueue.py`
puts the message on Redis.

Verification (as LiveKit's Go verifier does it, livekit/protocol `webhook/`):
  the `Authorization` header is a JWT (HS256) issued by one of our API keys (`iss` = key), valid
  now (`exp` required, `nbf` if present, a small leeway for clock skew), whose `sha256` claim is
  base64(SHA-256(raw body)), compared in constant time. LiveKit sends the bare JWT; a `Bearer `
  prefix is tolerated too (some proxies and hand-written senders add it): it changes nothing about
  what must verify.

Parsing: the body is protojson of `livekit.WebhookEvent`; we keep it as the dict LiveKit sent
(lowerCamelCase, int64 as strings) and only check its shape: an object with a non-empty string
`event` and `id`, and objects where the envelope has messages. Unknown fields (a newer server) and
unknown event names are accepted: the worker records every event.

The Celery message the backlog's nudge is pushed as, and its `task-sent` event, are built by
`orchestration.adapters.celery_messages`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from typing import Any, Mapping

import orjson

MAX_BODY_BYTES = 1024 * 1024
# LiveKit's tokens live 5 minutes; the SDKs' verifiers allow a minute of clock skew.
DEFAULT_LEEWAY_SECONDS = 60.0
MAX_EVENT_ID_LENGTH = 256

LIVEKIT_EVENT_TYPES = (
    "room_started", "room_finished",
    "participant_joined", "participant_left", "participant_connection_aborted",
    "track_published", "track_unpublished",
    "egress_started", "egress_updated", "egress_ended",
    "ingress_started", "ingress_ended",
)
# Envelope fields that are messages in `livekit.WebhookEvent`: when present they must be objects.
_MESSAGE_FIELDS = ("room", "participant", "track", "egressInfo", "ingressInfo")


class WebhookRejected(Exception):
    """A request we answer with an error. `reason` is for logs and metrics (never a secret)."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Unauthorized(WebhookRejected):
    status = 401
    code = "unauthorized"


class InvalidEvent(WebhookRejected):
    status = 400
    code = "invalid_request"


class PayloadTooLarge(WebhookRejected):
    status = 413
    code = "payload_too_large"

    def __init__(self, limit: int = MAX_BODY_BYTES) -> None:
        super().__init__("too_large", f"body over {limit} bytes")


def body_sha256(body: bytes) -> str:
    """What LiveKit puts in the `sha256` claim: base64 (standard, padded) of SHA-256(body)."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")


def _b64url(segment: bytes) -> bytes:
    """Strict base64url (no padding, as JWTs are written): anything else is malformed."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return binascii.a2b_base64((segment + _PADDING[len(segment) % 4]).translate(_URLSAFE_TO_STANDARD))


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    try:
        return int(claims[name])  # PyJWT's reading of NumericDate claims
    except (ValueError, TypeError, OverflowError):
        raise Unauthorized("malformed_token", f"token claim `{name}` is not a number") from None


class WebhookVerifier:
    """Checks LiveKit's signature against every accepted key:secret pair (key rotation).

    The checks are PyJWT's for `jwt.decode(token, secret, algorithms=["HS256"], issuer=key,
    leeway=..., options={"require": ["exp", "iss"]})` (tests/unit/test_webhook_verify.py holds
    them side by side with PyJWT on generated tokens), but done in one pass: `iss` has to be read
    before the secret is known, and PyJWT's decode costs ~35 us a token, half of the whole budget
    of a webhook at the rate we aim for (most of it a per-character check of the base64 alphabet,
    done here with one regex). The signature is HMAC-SHA256 over `header.payload`, compared in
    constant time, and only HS256 is accepted (the header is checked before anything else).
    """

    def __init__(self, keys: Mapping[str, str], leeway: float = DEFAULT_LEEWAY_SECONDS) -> None:
        if not keys:
            raise ValueError("no webhook keys configured")
        # HMAC-SHA256 keyed once per secret; each token copies the keyed state (hmac.HMAC.copy).
        self._keys = {key: hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256) for key, secret in keys.items()}
        self._leeway = leeway
        self._headers: dict[bytes, bool] = {}  # header segment -> acceptable (there are a few at most)

    def _check_header(self, segment: bytes) -> None:
        known = self._headers.get(segment)
        if known is None:
            try:
                header = orjson.loads(_b64url(segment))
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise Unauthorized("malformed_token", "malformed authorization token") from None
            if not isinstance(header, dict):
                raise Unauthorized("malformed_token", "malformed authorization token")
            crit = header.get("crit")
            known = (header.get("alg") == "HS256" and crit is None and header.get("b64", True) is True
                     and isinstance(header.get("kid", ""), str))
            if len(self._headers) < 64:
                self._headers[segment] = known
        if not known:
            raise Unauthorized("bad_signature", "token algorithm or header not accepted")

    def verify_token(self, authorization: str | bytes | None) -> dict[str, Any]:
        """The verified claims of the `Authorization` header; raises `Unauthorized`."""
        if isinstance(authorization, str):
            try:
                authorization = authorization.encode("ascii")
            except UnicodeEncodeError:
                raise Unauthorized("malformed_token", "malformed authorization token") from None
        token = (authorization or b"").strip()
        scheme, _, rest = token.partition(b" ")
        if scheme.lower() == b"bearer":
            token = rest.strip()
        if not token:
            raise Unauthorized("unsigned", "missing authorization token")
        parts = token.split(b".")
        if len(parts) != 3:
            raise Unauthorized("malformed_token", "malformed authorization token")
        header_segment, payload_segment, signature_segment = parts
        self._check_header(header_segment)
        try:
            claims = orjson.loads(_b64url(payload_segment))
            signature = _b64url(signature_segment)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Unauthorized("malformed_token", "malformed authorization token") from None
        if not isinstance(claims, dict):
            raise Unauthorized("malformed_token", "malformed authorization token")
        issuer = claims.get("iss")
        key = self._keys.get(issuer) if isinstance(issuer, str) else None
        if key is None:
            raise Unauthorized("unknown_key", "unknown API key")
        mac = key.copy()
        mac.update(token[: len(header_segment) + 1 + len(payload_segment)])
        if not hmac.compare_digest(signature, mac.digest()):
            raise Unauthorized("bad_signature", "bad token signature")
        if "exp" not in claims:
            raise Unauthorized("malformed_token", "token lacks a required claim")
        now = time.time()
        if _int_claim(claims, "exp") <= now - self._leeway:
            raise Unauthorized("expired", "token expired")
        if "nbf" in claims and _int_claim(claims, "nbf") > now + self._leeway:
            raise Unauthorized("not_yet_valid", "token not yet valid")
        if "iat" in claims and _int_claim(claims, "iat") > now + self._leeway:
            raise Unauthorized("not_yet_valid", "token not yet valid")
        if claims.get("aud"):
            raise Unauthorized("malformed_token", "token is meant for an audience")
        return claims

    @staticmethod
    def check_body(claims: Mapping[str, Any], body: bytes) -> None:
        """The body is the one LiveKit signed; raises `Unauthorized`."""
        claimed = claims.get("sha256")
        if not isinstance(claimed, str) or not claimed:
            raise Unauthorized("hash_mismatch", "token carries no body hash")
        if not hmac.compare_digest(claimed.encode("ascii", "replace"), body_sha256(body).encode("ascii")):
            raise Unauthorized("hash_mismatch", "body does not match the signed hash")

    def verify(self, authorization: str | bytes | None, body: bytes) -> dict[str, Any]:
        claims = self.verify_token(authorization)
        self.check_body(claims, body)
        return claims


def parse_event(body: bytes) -> dict[str, Any]:
    """The webhook event as LiveKit sent it (protojson dict); raises `InvalidEvent`."""
    try:
        # orjson: strict RFC 8259 (no NaN/Infinity), valid UTF-8 only, no lone surrogates, depth-capped.
        event = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        raise InvalidEvent("not_json", "body is not JSON") from None
    if not isinstance(event, dict):
        raise InvalidEvent("bad_shape", "body is not a LiveKit webhook event") from None
    name, event_id = event.get("event"), event.get("id")
    if not isinstance(name, str) or not name:
        raise InvalidEvent("bad_shape", "webhook event has no `event` name")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent("bad_shape", "webhook event has no `id`")
    if len(event_id) > MAX_EVENT_ID_LENGTH or len(name) > 100:
        raise InvalidEvent("bad_shape", "webhook event `id` or `event` too long")
    for field in _MESSAGE_FIELDS:
        value = event.get(field)
        if value is not None and not isinstance(value, dict):
            raise InvalidEvent("bad_shape", f"webhook event `{field}` is not an object")
    created = event.get("createdAt")
    if created is not None and (isinstance(created, bool) or not isinstance(created, (str, int))):
        raise InvalidEvent("bad_shape", "webhook event `createdAt` is not an int64")
    return event


def livekit_event_args(body: bytes, received_at: str) -> bytes:
    """`[event, received_at]`, the arguments of `callflow.livekit_event`, as JSON: what the webhook
    backlog lists. The body is spliced in as it came (it is JSON: `parse_event` parsed it
    strictly), so the worker gets exactly what LiveKit sent."""
    return b"".join((b"[", body, b", ", orjson.dumps(received_at), b"]"))
