"""LiveKit webhooks, the pure part: verify the signature, parse the event, build the Celery message.

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

The message: Celery protocol 2 (`celery.app.amqp.AMQP.as_task_v2`), wrapped the way kombu's Redis
transport writes it onto the queue's list (`kombu.transport.virtual.Channel.prepare_message` +
`_inplace_augment_message`, body base64-encoded), so a stock `celery worker` consumes it. Beside
it, the `task-sent` event `send_task` would publish for it (`PreBuiltTask`), for Flower.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, NamedTuple

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


# ---- Celery protocol 2 on kombu's Redis transport ---------------------------------------------------

_EMBED_JSON = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
_MARKER = re.compile(r'"@@(\w+)@@"|@@(\w+)@@')

# Whether the messages callflow pushes itself (not through `send_task`: the backlogs' nudges, the
# ring-timeout countdowns) are announced with the `task-sent` event `send_task` publishes when
# Celery's `task_send_sent_event` is on. One switch for both: `workers.app` sets
# `task_send_sent_event` from this. On: Flower lists every task as SENT from the moment it is
# queued. For the pre-built messages it costs no round trip (the PUBLISH goes in the script that
# pushes), and Redis drops an event nobody subscribes to.
TASK_SENT_EVENTS = True


def task_sent_channel(db: int | str | None) -> bytes:
    """The Redis channel a `task-sent` event goes out on, for a broker on Redis database `db`.

    Celery sends events to the `celeryev` exchange, which on Redis is a fanout exchange
    (`celery.events.event.get_exchange`), with the event type as routing key (`task.sent`); kombu's
    Redis transport PUBLISHes fanout messages on `<fanout prefix><exchange>/<routing key>`, the
    prefix being `/<db>.` (`Channel.keyprefix_fanout`, `_get_publish_topic`). Event receivers
    (Flower, `app.events.Receiver`) PSUBSCRIBE to `/<db>.celeryev/*`."""
    return f"/{int(db or 0)}.celeryev/task.sent".encode()


def task_sent_channel_of(redis: Any) -> bytes:
    """`task_sent_channel` for the database of `redis` (a redis-py client or connection pool,
    sync or asyncio, on the broker's `REDIS_URL`)."""
    return task_sent_channel(getattr(redis, "connection_pool", redis).connection_kwargs.get("db"))


# The Lua function of every script that pushes a pre-built message: LPUSH `message` onto `queue`
# and, only once it is there, PUBLISH its `task-sent` event (none when `sent_event` is empty) on
# `channel`. In the script that pushes, so no round trip is added, and an event receiver hears of
# the task before any worker can take it (Redis serves a blocked BRPOP after the script). Returns
# LPUSH's reply: the list's length, or an error table.
PUSH_TASK_LUA = """
local function push_task(queue, message, channel, sent_event)
  local pushed = redis.pcall('LPUSH', queue, message)
  if type(pushed) == 'number' and sent_event ~= '' then redis.call('PUBLISH', channel, sent_event) end
  return pushed
end
"""


def _byte_template(value: Any, json_slots: frozenset[str]) -> bytes:
    """`value` as JSON, a bytes %-template: a marker `@@NAME@@` inside a string becomes the slot
    `%(NAME)s` for raw text; a marker that is a whole string and in `json_slots` takes its JSON
    value (quotes and all)."""

    def slot(match: re.Match) -> str:
        quoted, inner = match.group(1), match.group(2)
        if quoted is not None:
            return f"%({quoted})s" if quoted in json_slots else f'"%({quoted})s"'
        return f"%({inner})s"

    return _MARKER.sub(slot, json.dumps(value).replace("%", "%%")).encode("utf-8")


def _utcoffset() -> float:
    """`celery.utils.time.utcoffset()` (hours west of UTC, as Celery's events carry it)."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


class PreBuiltTask(NamedTuple):
    """A task message as `send_task` would push it onto its queue's list, and the `task-sent` event
    `send_task` would publish with it (empty when `task-sent` events are off): whoever pushes the
    message PUBLISHes the event on `task_sent_channel`, in the same script, only once it pushed."""

    message: bytes
    sent_event: bytes


def livekit_event_args(body: bytes, received_at: str) -> bytes:
    """`[event, received_at]`, the arguments of `callflow.livekit_event`, as JSON: what the webhook
    backlog lists. The body is spliced in as it came (it is JSON: `parse_event` parsed it
    strictly), so the worker gets exactly what LiveKit sent."""
    return b"".join((b"[", body, b", ", orjson.dumps(received_at), b"]"))


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class CeleryMessageBuilder:
    """Builds the bytes `app.send_task(task, args, queue=queue)` would LPUSH with Redis.

    `reply_to` and `origin` are per process, as Celery's are (`app.thread_oid`, `gen<pid>@<host>`).
    The envelope is rendered once into a template; a message is then one join of its parts.
    `prebuilt` adds the message's `task-sent` event (unless `sent_events` is off), made the same way.
    """

    task: str
    queue: str
    origin: str = ""
    reply_to: str = ""
    sent_events: bool = TASK_SENT_EVENTS

    @classmethod
    def for_task(cls, task: str, queue: str, sent_events: bool = TASK_SENT_EVENTS) -> "CeleryMessageBuilder":
        return cls(task, queue, origin=f"gen{os.getpid()}@{socket.gethostname()}", reply_to=str(uuid.uuid4()),
                   sent_events=sent_events)

    def __post_init__(self) -> None:
        envelope = {
            "body": "@@BODY@@",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": self.task,
                "id": "@@ID@@",
                "shadow": None,
                "eta": "@@ETA@@",
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": "@@ID@@",
                "parent_id": None,
                "argsrepr": "@@ARGSREPR@@",
                "kwargsrepr": "{}",
                "origin": self.origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": "@@ID@@",
                "reply_to": self.reply_to,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": "@@TAG@@",
            },
        }
        object.__setattr__(self, "_template", _byte_template(envelope, frozenset({"ARGSREPR", "ETA"})))
        # The `task-sent` event as `send_task` publishes it (`AMQP.send_task_message` and
        # `EventDispatcher.publish`, the body JSON in kombu's fanout envelope): its fields in Celery's
        # order; `hostname` is the sender's node name (the message's origin), `clock` a per-process
        # Lamport clock that only moves forward (receivers ignore a client's clock for `task-sent`).
        event = {
            "hostname": self.origin, "utcoffset": "@@UTCOFFSET@@", "pid": os.getpid(), "clock": "@@CLOCK@@",
            "uuid": "@@ID@@", "root_id": "@@ID@@", "parent_id": None, "name": self.task,
            "args": "@@ARGSREPR@@", "kwargs": "{}", "retries": 0, "eta": "@@ETA@@", "expires": None,
            "queue": self.queue, "exchange": "", "routing_key": self.queue,
            "timestamp": "@@TIMESTAMP@@", "type": "task-sent",
        }
        object.__setattr__(self, "_event_template", _byte_template(
            event, frozenset({"UTCOFFSET", "CLOCK", "ARGSREPR", "ETA", "TIMESTAMP"})))
        object.__setattr__(self, "_event_envelope", _byte_template({
            "body": "@@BODY@@",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": self.origin},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": "@@TAG@@",
            },
        }, frozenset()))
        object.__setattr__(self, "_clock", itertools.count(1))
        # Task ids: UUID-shaped (version 4 bits set), a random 80-bit prefix per builder and a
        # counter: unique without a urandom call per message.
        h = os.urandom(10).hex()
        object.__setattr__(self, "_id_prefix", f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{'89ab'[int(h[15], 16) & 3]}{h[16:19]}-")
        object.__setattr__(self, "_counter", itertools.count(int.from_bytes(os.urandom(3), "big")))

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"

    def build_from_json(self, args_json: bytes, argsrepr: str, task_id: str | None = None,
                        eta: datetime | None = None) -> bytes:
        """`args_json`: the JSON array of the task's positional arguments, already serialised.
        `eta` (timezone-aware): the worker holds the task until then, as for `send_task(eta=...)`."""
        task_id_b = (task_id or self._next_id()).encode("ascii")
        return self._template % {
            b"ETA": orjson.dumps(eta.isoformat()) if eta is not None else b"null",
            b"BODY": binascii.b2a_base64(b"".join((b"[", args_json, b", {}, ", _EMBED_JSON, b"]")), newline=False),
            b"ID": task_id_b,
            # kombu's delivery tag only has to be unique per message: the task id is.
            b"TAG": task_id_b,
            b"ARGSREPR": orjson.dumps(argsrepr),
        }

    def build(self, args: list[Any], task_id: str | None = None, argsrepr: str | None = None,
              eta: datetime | None = None) -> bytes:
        return self.build_from_json(json.dumps(args).encode("utf-8"),
                                    argsrepr if argsrepr is not None else _short_repr(args), task_id, eta)

    def prebuilt(self, args: list[Any] | None = None, argsrepr: str | None = None,
                 eta: datetime | None = None) -> PreBuiltTask:
        """A new message (an id of its own) and its `task-sent` event; `args` default to none."""
        task_id = self._next_id()
        args_json = json.dumps(args).encode("utf-8") if args is not None else b"[]"
        if argsrepr is None:
            argsrepr = _short_repr(args) if args is not None else "()"
        message = self.build_from_json(args_json, argsrepr, task_id, eta)
        return PreBuiltTask(message, self.sent_event(task_id, argsrepr, eta) if self.sent_events else b"")

    def sent_event(self, task_id: str, argsrepr: str, eta: datetime | None = None) -> bytes:
        """The `task-sent` event of this builder's message `task_id`, as kombu PUBLISHes it."""
        body = self._event_template % {
            b"ID": task_id.encode("ascii"),
            b"ARGSREPR": orjson.dumps(argsrepr),
            b"ETA": orjson.dumps(eta.isoformat()) if eta is not None else b"null",
            b"CLOCK": b"%d" % next(self._clock),
            b"TIMESTAMP": orjson.dumps(time.time()),
            b"UTCOFFSET": orjson.dumps(_utcoffset()),
        }
        # kombu's delivery tag only has to be unique per message: the task id is.
        return self._event_envelope % {b"BODY": binascii.b2a_base64(body, newline=False),
                                       b"TAG": task_id.encode("ascii")}

