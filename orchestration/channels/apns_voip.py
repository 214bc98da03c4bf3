"""The APNs VoIP channel: `push_messages` rows of PushKit devices (`provider` `apns_voip`) as APNs VoIP
pushes, so an iPhone rings like a phone (CallKit). The rules of every push (deadline, shares,
disabled devices) are `orchestration.push.channel.PushChannel`'s.

What is APNs's own (../shared/PROTOCOLS.md, "APNs VoIP pushes"; the contract's "Ringing like a
phone"):
- only `incoming_call` goes: a VoIP push that reports no call to CallKit gets the app killed, and
  after repeats iOS stops delivering them (the database gives these devices nothing else; if a row
  of another kind came, it is refused, never sent);
- one HTTP/2 request a message, `POST {APNS_URL}/3/device/<token>` with `apns-push-type: voip`,
  topic `<APNS_TOPIC>.voip`, priority 10, `apns-expiration` the ring deadline, `apns-collapse-id`
  the invitation id; a batch's requests go at once over the process's one connection (an
  `http://` APNS_URL, a stand-in, is spoken to with prior knowledge: h2c);
- the provider token (ES256 JWT) is made once per REFRESH_SECONDS per key, for the whole process,
  and made again once on 403 `ExpiredProviderToken` / `InvalidProviderToken` (the message then
  tried once more); APNs refuses one older than an hour and throttles new ones under 20 minutes;
- 200: sent (the `apns-id`); 410 `Unregistered` or 400 `BadDeviceToken`: the device is turned off;
  other 4xx: failed; 429, 5xx or no answer for a message: it goes again (`NoAnswer`), and when no
  message of the batch was answered at all (the connection failed, or every answer was a 429/5xx),
  the delivery loop takes it as APNs giving no answer: its retry loop (every worker's) says when.

Without the APNS_* settings: in development each push is a JSON file in `$CALLFLOW_OUTBOX_DIR/push/`
(`apns_voip-<invitation id>-<8 hex>.json`); in production nothing is sent (the rows fail, saying why).
A send cut off by a crash before its outcome was stored is sent again; the app drops the duplicate
by `invitation_id` (and APNs collapses it by the collapse id).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import structlog

from orchestration import names
from orchestration.delivery.channel import HTTP2_LOST_STREAM, NoAnswer, Provider, Record, Refused, Rejected, Sent
from orchestration.push.channel import PushChannel

log = structlog.get_logger("callflow.push")

PROVIDER_NAME = "apns_voip"        # push_tokens.provider
TIMEOUT_SECONDS = 10.0
BATCH_SIZE = 20                    # requests at once over the one connection
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
REFRESH_SECONDS = 30 * 60          # a provider token is reused this long (APNs: 20 to 60 minutes)
MAX_PAYLOAD_BYTES = 5120           # APNs's limit for a VoIP push
MAX_COLLAPSE_ID_BYTES = 64
MAX_CALLER_NAME = 200              # characters of the caller's name in the payload
ONLY_RINGS = "VoIP pushes only ring: an apns_voip device gets incoming_call only"
GONE_REASONS = {"Unregistered", "BadDeviceToken"}       # the contract's: the device is turned off
TOKEN_REASONS = {"ExpiredProviderToken", "InvalidProviderToken"}  # a new provider token, once
NO_ANSWER = 0                      # the status of a message whose request got no answer


def apns_provider(settings) -> Provider:
    return Provider(name="apns", rate_key=names.RATELIMIT_APNS,
                    rate_per_second=settings.callflow_push_rate_per_second,
                    retry_base_seconds=RETRY_BASE_SECONDS, retry_max_seconds=RETRY_MAX_SECONDS,
                    probe_seconds=TIMEOUT_SECONDS + 2)


# ---- the message -------------------------------------------------------------------------------

def voip_payload(row) -> dict:
    """What the app gets: enough to report the call to CallKit at once (≤ 5 KB)."""
    payload = {"kind": row.kind, "invitation_id": row.invitation_id, "room_name": row.room_name,
               "call_type": row.call_type, "caller_id": row.caller_id,
               "caller_name": (row.caller_name or "")[:MAX_CALLER_NAME],
               "ring_deadline": row.ring_deadline.isoformat() if row.ring_deadline else None}
    while len(json.dumps(payload).encode()) > MAX_PAYLOAD_BYTES and payload["caller_name"]:
        payload["caller_name"] = payload["caller_name"][: len(payload["caller_name"]) // 2]
    return payload


def voip_message(row, now: datetime) -> dict:
    """The request of one row (pure: the same on every attempt): the device, the headers of its own
    (`apns-expiration` the ring deadline, `apns-collapse-id` the invitation id) and the payload; a
    row of another kind than `incoming_call` carries only why it is refused."""
    if row.kind != "incoming_call":
        return {"token": row.token, "invitation_id": row.invitation_id, "refuse": ONLY_RINGS}
    expiration = math.floor(row.ring_deadline.timestamp()) if row.ring_deadline else 0
    return {"token": row.token, "invitation_id": row.invitation_id,
            "expiration": expiration,
            "collapse_id": row.invitation_id.encode()[:MAX_COLLAPSE_ID_BYTES].decode(errors="ignore"),
            "payload": voip_payload(row)}


# ---- the provider token (process-wide) -------------------------------------------------------

class ProviderTokens:
    """One provider token per signing key for the whole process, made again after REFRESH_SECONDS,
    or once when APNs refuses it (`refresh(stale)`: several requests refused the same token make
    one new token)."""

    _all: dict[tuple, "ProviderTokens"] = {}
    _all_lock = threading.Lock()

    def __init__(self, key_id: str, team_id: str, private_key_pem: str) -> None:
        self.key_id, self.team_id, self._pem = key_id, team_id, private_key_pem
        self._key = None
        self._token: str | None = None
        self._made_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, key_id: str, team_id: str, private_key_pem: str) -> "ProviderTokens":
        ident = (key_id, team_id, hashlib.sha256(private_key_pem.encode()).hexdigest())
        with cls._all_lock:
            if ident not in cls._all:
                cls._all[ident] = cls(key_id, team_id, private_key_pem)
            return cls._all[ident]

    def _make(self) -> str:
        import jwt
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if self._key is None:
            try:
                self._key = load_pem_private_key(self._pem.encode(), password=None)
            except (ValueError, TypeError) as exc:
                raise Rejected(f"APNS_PRIVATE_KEY is not a PEM private key (ES256): {exc.__class__.__name__}") from None
        now = time.time()
        try:
            token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self._key, algorithm="ES256",
                               headers={"kid": self.key_id, "typ": None})
        except Exception as exc:  # noqa: BLE001 - a key that cannot sign ES256
            raise Rejected(f"APNS_PRIVATE_KEY cannot sign an ES256 provider token: {exc.__class__.__name__}") from None
        self._token, self._made_at = token, now
        log.info("apns: new provider token", key_id=self.key_id)
        return token

    def current(self) -> str:
        with self._lock:
            if self._token is None or time.time() - self._made_at >= REFRESH_SECONDS:
                return self._make()
            return self._token

    def refresh(self, stale: str) -> str:
        """A new token in place of `stale` (which APNs refused), unless another request made one already."""
        with self._lock:
            if self._token == stale or self._token is None:
                return self._make()
            return self._token


def _after_fork() -> None:  # a lock held by another thread at fork time stays held in the child
    ProviderTokens._all_lock = threading.Lock()
    for tokens in ProviderTokens._all.values():
        tokens._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# ---- the clients -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    status: int                # NO_ANSWER: the request got no answer (connection, timeout)
    reason: str = ""
    apns_id: str | None = None
    timestamp: int | None = None


class ApnsClient:
    """APNs over HTTP/2: one connection per process (the client is made in the process that sends,
    and again after a fork), a batch's requests at once over it."""

    def __init__(self, base_url: str, topic: str, tokens: ProviderTokens, timeout: float = TIMEOUT_SECONDS,
                 concurrency: int = BATCH_SIZE) -> None:
        self.base_url = base_url.rstrip("/")
        self.topic = topic if topic.endswith(".voip") else topic + ".voip"
        self.tokens, self.timeout, self.concurrency = tokens, timeout, concurrency
        self._pid: int | None = None
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _clients(self) -> tuple[httpx.Client, ThreadPoolExecutor]:
        with self._lock:
            if self._pid != os.getpid():
                prior_knowledge = self.base_url.startswith("http://")  # h2c: no HTTP/1.1 upgrade
                self._http = httpx.Client(http2=True, http1=not prior_knowledge, timeout=self.timeout,
                                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="apns")
                self._pid = os.getpid()
            return self._http, self._pool

    def close(self) -> None:
        with self._lock:
            if self._http is not None and self._pid == os.getpid():
                self._http.close()
                self._pool.shutdown(wait=False)
            self._http = self._pool = self._pid = None

    def _post(self, http: httpx.Client, message: dict, provider_token: str) -> Answer:
        headers = {"authorization": f"bearer {provider_token}", "apns-push-type": "voip",
                   "apns-topic": self.topic, "apns-priority": "10",
                   "apns-expiration": str(message["expiration"]), "apns-collapse-id": message["collapse_id"],
                   "apns-id": message.get("apns_id") or str(uuid.uuid4()),
                   "content-type": "application/json"}
        body = json.dumps(message["payload"], separators=(",", ":")).encode()
        try:
            resp = http.post(f"{self.base_url}/3/device/{message['token']}", headers=headers, content=body)
        except (httpx.HTTPError, *HTTP2_LOST_STREAM) as exc:
            return Answer(NO_ANSWER, f"{exc.__class__.__name__}: {exc}"[:300])
        if resp.status_code == 200:
            return Answer(200, apns_id=resp.headers.get("apns-id") or headers["apns-id"])
        reason, timestamp = "", None
        try:
            data = resp.json()
            reason, timestamp = str(data.get("reason") or ""), data.get("timestamp")
        except ValueError:
            reason = resp.text[:200]
        return Answer(resp.status_code, reason or f"HTTP {resp.status_code}", timestamp=timestamp)

    def _one(self, http: httpx.Client, message: dict) -> Answer:
        provider_token = self.tokens.current()
        answer = self._post(http, message, provider_token)
        if answer.status == 403 and answer.reason in TOKEN_REASONS:
            log.info("apns: provider token refused, making a new one", reason=answer.reason)
            answer = self._post(http, message, self.tokens.refresh(provider_token))
        return answer

    def send(self, messages: list[dict]) -> list[Answer]:
        """Each message's answer, in order; the requests at once over the one connection."""
        if not messages:
            return []
        self.tokens.current()  # a key that cannot sign refuses the batch before any request
        http, pool = self._clients()
        if len(messages) == 1:
            return [self._one(http, messages[0])]
        return list(pool.map(lambda m: self._one(http, m), messages))


class OutboxClient:
    """Development without APNS_*: each push is a JSON file (what would have been sent: the device,
    the headers but the provider token, the payload); every one is answered 200."""

    def __init__(self, folder: Path, topic: str | None = None) -> None:
        self.folder = Path(folder)
        self.topic = (topic or "<APNS_TOPIC>") + ".voip"

    def send(self, messages: list[dict]) -> list[Answer]:
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for message in messages:
            apns_id = str(uuid.uuid4())
            record = {"provider": PROVIDER_NAME, "token": message["token"], "path": f"/3/device/{message['token']}",
                      "headers": {"apns-push-type": "voip", "apns-topic": self.topic, "apns-priority": "10",
                                  "apns-expiration": str(message["expiration"]),
                                  "apns-collapse-id": message["collapse_id"], "apns-id": apns_id},
                      "payload": message["payload"]}
            name = f"{PROVIDER_NAME}-{message['invitation_id']}-{apns_id.replace('-', '')[:8]}.json"
            (self.folder / name).write_text(json.dumps(record, indent=2, default=str))
            out.append(Answer(200, apns_id=f"outbox-{apns_id}"))
        return out


class NotConfigured:
    """Production without APNS_*: no VoIP pushes (the rows fail, saying why)."""

    def send(self, messages: list[dict]) -> list[Answer]:
        raise Rejected("APNs is not configured (APNS_KEY_ID, APNS_TEAM_ID, APNS_PRIVATE_KEY, APNS_TOPIC): "
                       "no VoIP pushes")


def client_for(settings):
    if settings.apns_configured:
        tokens = ProviderTokens.of(settings.apns_key_id, settings.apns_team_id,
                                   settings.apns_private_key.get_secret_value())
        return ApnsClient(settings.apns_url, settings.apns_topic, tokens)
    if settings.is_production:
        return NotConfigured()
    return OutboxClient(Path(settings.callflow_outbox_dir) / "push", settings.apns_topic)


# ---- the channel -------------------------------------------------------------------------------

def _is_no_answer(answer: Answer) -> bool:
    return answer.status == NO_ANSWER or answer.status == 429 or answer.status >= 500


class ApnsVoipChannel(PushChannel):
    name = names.CHANNEL_APNS_VOIP
    queue = names.CHANNEL_QUEUES[name]
    provider_name = PROVIDER_NAME
    batch_size = BATCH_SIZE

    def __init__(self, client, provider: Provider, database_url: str) -> None:
        self.client, self.provider, self.database_url = client, provider, database_url

    @classmethod
    def from_settings(cls, settings) -> "ApnsVoipChannel":
        return cls(client_for(settings), apns_provider(settings), settings.database_url)

    def compose(self, row: Record, now: datetime) -> dict:
        return voip_message(row, now)

    def send(self, messages: list[dict]):
        results: list = [None] * len(messages)
        todo = []
        for i, message in enumerate(messages):
            if "refuse" in message:
                results[i] = Refused(message["refuse"])
            else:
                todo.append(i)
        # Not one message answered: the loop takes it as APNs giving no answer (its retry loop).
        answers = self.client.send([messages[i] for i in todo]) if todo else []
        for i, answer in zip(todo, answers):
            token = messages[i]["token"]
            if answer.status == 200:
                results[i] = Sent(answer.apns_id)
            elif _is_no_answer(answer):
                results[i] = NoAnswer(f"APNs gave no answer: {answer.reason or answer.status}"
                                      + (f" (HTTP {answer.status})" if answer.status else ""),
                                      rate_limited=answer.status == 429)
            else:
                error = f"APNs {answer.status} {answer.reason}"
                if answer.timestamp is not None:
                    error += f" (since {answer.timestamp})"
                results[i] = Refused(error, gone=token if answer.reason in GONE_REASONS else None)
        return results

    def describe_sent(self, row: Record, message, result: Sent) -> dict:
        return {"invitation_id": row.invitation_id, "provider": PROVIDER_NAME}
