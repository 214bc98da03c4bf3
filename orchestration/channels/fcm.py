"""The FCM channel: `push_messages` rows of Android devices registered with an FCM token (`provider`
`fcm`), as data-only messages through FCM HTTP v1 (../shared/PROTOCOLS.md, "FCM HTTP v1"), or JSON
files in development. The rules of every push (deadline, shares, disabled devices) are
`orchestration.push.channel.PushChannel`'s.

What is FCM's own:
- One message a request (`POST {FCM_URL}/v1/projects/<project>/messages:send`): a batch of up to
  BATCH_SIZE rows goes as that many requests at once (CONCURRENCY at a time) over one kept-alive
  HTTP client per process (HTTP/2 when the server speaks it).
- The OAuth access token: the service account signs a JWT (RS256, `aud` the token URL) and trades
  it at the token URL (`google-auth`, over the same httpx client: no `requests`); one token serves
  every message until it is near its expiry (google-auth's margin, 3 min 45 s), then one refresh,
  under a lock, for all threads. An answer 401 refreshes it once (only if nobody refreshed it
  meanwhile) and sends that message once more.
- The message: `data` only (no `notification`: the app draws its own full-screen call screen),
  every value a string (a missing one is left out), `android.priority` HIGH, `android.ttl` the time
  to the ring deadline for `incoming_call` (at least 1 s), CALL_ENDED_TTL for `call_ended`,
  MISSED_CALL_TTL for `missed_call`, `android.collapse_key` the invitation id (a device that was
  offline gets only the latest of one call's pushes: the call_ended replaces its ring).
- Answers, per message: 200 sent (FCM's message name kept as the row's ticket); `UNREGISTERED` (404)
  a refusal that turns the device off; any other 4xx (400 `INVALID_ARGUMENT`, 403
  `SENDER_ID_MISMATCH`, a second 401) a refusal; 429 `QUOTA_EXCEEDED`, 5xx, a timeout or a
  connection error no answer (`NoAnswer`: the row goes again with the loop's backoff).
- When no message of a batch got an answer, the send raises `Unavailable` instead, with the
  longest `Retry-After` asked (and `rate_limited` if all were 429s): the shared retry loop then
  holds every worker off FCM for that long (and 429s alone also hold the rate), which a per-message
  `NoAnswer` cannot do (the loop retries those with its own backoff, not their `Retry-After`). A batch partly answered keeps its sent rows sent and retries only the
  others (raising would send the answered ones twice).
- The access token cannot be had: no answer from the token URL (a timeout, 5xx, 429) is
  `Unavailable`; a refusal (a bad key, `invalid_grant`) is `Rejected` (every message of the batch
  fails, with the token URL's reason).
- Without FCM_*: JSON files `fcm-<kind>-<invitation id>-<8 hex>.json` in `$CALLFLOW_OUTBOX_DIR/push/`
  in development (no rate, no retry loop); in production nothing is sent (the rows fail, saying why).
A send cut off after FCM took it (a timeout) is sent again; the app drops the duplicate by `kind` +
`invitation_id`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx

from orchestration import names
from orchestration.delivery.channel import (HTTP2_LOST_STREAM, NoAnswer, Provider, Record, Refused, Rejected, Sent,
                                            Unavailable)
from orchestration.push.channel import PushChannel
from orchestration.push.messages import CALL_ENDED_TTL

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
UNREGISTERED = "UNREGISTERED"
BATCH_SIZE = 20          # rows a run takes: that many requests, CONCURRENCY at a time
CONCURRENCY = 10
TIMEOUT_SECONDS = 10.0   # FCM answers in well under a second; longer is no answer
MISSED_CALL_TTL = 86400  # a missed call is still news the next day, not the next week
INCOMING_CALL_TTL = 30   # an incoming call without a ring deadline (never, in practice)
# FCM unavailable: the wait before the next try, from 0.5 s up to 10 s (as Expo's).
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0


def fcm_provider(settings) -> Provider:
    return Provider(name="fcm", rate_key=names.RATELIMIT_FCM,
                    rate_per_second=settings.callflow_push_rate_per_second,
                    retry_base_seconds=RETRY_BASE_SECONDS, retry_max_seconds=RETRY_MAX_SECONDS,
                    probe_seconds=TIMEOUT_SECONDS + 2)


def compose(row, now: datetime) -> dict:
    """The request body for one row: `{"message": {"token", "data", "android"}}` (pure)."""
    data = {"kind": row.kind, "invitation_id": row.invitation_id, "room_name": row.room_name,
            "call_type": row.call_type, "caller_id": row.caller_id, "caller_name": row.caller_name}
    if row.kind == "incoming_call":
        data["ring_deadline"] = row.ring_deadline.isoformat() if row.ring_deadline else None
        ttl = max(1, math.ceil((row.ring_deadline - now).total_seconds())) if row.ring_deadline else INCOMING_CALL_TTL
    elif row.kind == "call_ended":
        data.update(status=row.invitation_status, end_reason=row.end_reason)
        ttl = CALL_ENDED_TTL
    else:  # missed_call
        ttl = MISSED_CALL_TTL
    return {"message": {
        "token": row.token,
        "data": {k: str(v) for k, v in data.items() if v is not None},
        "android": {"priority": "HIGH", "ttl": f"{ttl}s", "collapse_key": str(row.invitation_id)},
    }}


Outcome = Sent | Refused | NoAnswer


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` in seconds (a number of seconds, or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def outcome_of(token: str, response: httpx.Response) -> Outcome:
    """What one answer of messages:send means for its message."""
    if response.status_code == 200:
        try:
            return Sent((response.json() or {}).get("name"))
        except ValueError:
            return Sent(None)
    try:
        error = (response.json() or {}).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    code = next((d.get("errorCode") for d in error.get("details") or []
                 if isinstance(d, dict) and d.get("@type") == FCM_ERROR_TYPE and d.get("errorCode")), None)
    code = code or error.get("status") or "error"
    text = f"FCM answered {response.status_code} {code}: {str(error.get('message') or response.text)[:300]}"
    if response.status_code in (408, 429) or response.status_code >= 500:
        return NoAnswer(text, retry_after_seconds(response.headers.get("retry-after")),
                          rate_limited=response.status_code == 429)
    return Refused(text, gone=token if code == UNREGISTERED else None)


class TokenUnavailable(Exception):
    """No access token: the token URL gave no answer (a timeout, 5xx, 429)."""


class TokenRefused(Exception):
    """No access token: the token URL refused the service account (a bad key, invalid_grant)."""


def service_account_info(value: str) -> dict:
    """FCM_SERVICE_ACCOUNT_JSON: the key's JSON text, or a path to it."""
    text = value if value.lstrip().startswith("{") else Path(value).expanduser().read_text()
    return json.loads(text)


class TokenRequest:
    """google-auth's transport (`google.auth.transport.Request`) over this process's httpx client,
    with the client's timeout (google-auth's own default is 120 s)."""

    def __init__(self, http: httpx.Client, timeout: float) -> None:
        self.http, self.timeout = http, timeout

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        from google.auth import exceptions as auth_exceptions

        try:
            response = self.http.request(method, url, content=body, headers=headers,
                                         timeout=min(timeout or self.timeout, self.timeout))
        except httpx.HTTPError as exc:
            raise auth_exceptions.TransportError(f"{exc.__class__.__name__}: {exc}") from exc
        return TokenResponse(response)


class TokenResponse:
    """An httpx answer as google-auth reads one (`status`, `headers`, `data`)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status, self.headers, self.data = response.status_code, response.headers, response.content


class FcmClient:
    """FCM HTTP v1 for one project, with one service account's access token (thread-safe)."""

    rate_limited = True

    def __init__(self, project_id: str, info: dict, base_url: str, token_url: str | None = None,
                 timeout: float = TIMEOUT_SECONDS, concurrency: int = CONCURRENCY) -> None:
        from google.oauth2 import service_account

        token_url = token_url or info.get("token_uri") or DEFAULT_TOKEN_URL
        # google-auth signs `aud` as Google's token URL whatever `token_uri` says: the claim names the
        # URL the assertion is posted to (the same for Google's own).
        self.credentials = service_account.Credentials.from_service_account_info(
            dict(info, token_uri=token_url), scopes=[SCOPE], additional_claims={"aud": token_url})
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.timeout = timeout
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._auth_request = None
        self.refreshes = 0  # access tokens fetched (for tests and the log)

    # ---- per process: the HTTP client, the threads, the token URL's session --------------------------

    def _here(self) -> None:
        """The kept-alive clients of this process (a forked child makes its own)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            try:
                http = httpx.Client(http2=True, timeout=self.timeout)
            except ImportError:  # no h2: HTTP/1.1 (FCM speaks both)
                http = httpx.Client(timeout=self.timeout)
            self._http = http
            self._auth_request = TokenRequest(http, self.timeout)
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fcm") if self.concurrency > 1 else None
            self._pid = os.getpid()

    # ---- the access token ----------------------------------------------------------------------------

    def access_token(self, stale: str | None = None) -> str:
        """A valid access token: the one held, unless it is near its expiry or is `stale` (FCM
        answered 401 to it), then one refresh for every thread."""
        from google.auth import exceptions as auth_exceptions

        self._here()
        with self._lock:
            creds = self.credentials
            if creds.valid and creds.token and creds.token != stale:
                return creds.token
            try:
                creds.refresh(self._auth_request)
            except auth_exceptions.TransportError as exc:
                raise TokenUnavailable(f"FCM's token URL gave no answer: {exc}") from None
            except auth_exceptions.RefreshError as exc:
                if getattr(exc, "retryable", False):
                    raise TokenUnavailable(f"FCM's token URL gave no answer: {exc}") from None
                raise TokenRefused(f"FCM's token URL refused the service account: {exc}") from None
            self.refreshes += 1
            return creds.token

    # ---- sending -------------------------------------------------------------------------------------

    def _post(self, body: dict, token: str) -> httpx.Response:
        return self._http.post(self.url, json=body, headers={"Authorization": f"Bearer {token}"})

    def _send_one(self, body: dict, token: str) -> Outcome:
        device = body["message"]["token"]
        try:
            response = self._post(body, token)
            if response.status_code == 401:  # the token expired early or was revoked: one refresh, once more
                try:
                    token = self.access_token(stale=token)
                except TokenUnavailable as exc:
                    return NoAnswer(str(exc))
                except TokenRefused as exc:
                    return Refused(str(exc))
                response = self._post(body, token)
        except (httpx.HTTPError, *HTTP2_LOST_STREAM) as exc:
            return NoAnswer(f"FCM gave no answer: {exc.__class__.__name__}: {exc}")
        return outcome_of(device, response)

    def send(self, messages: list[dict]) -> list[Outcome]:
        """One request a message, answered in the same order. Raises TokenUnavailable or
        TokenRefused when no access token can be had."""
        token = self.access_token()
        if len(messages) == 1 or self._pool is None:
            return [self._send_one(m, token) for m in messages]
        return list(self._pool.map(lambda m: self._send_one(m, token), messages))

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class NotConfigured:
    """Production without FCM_*: no FCM pushes (the rows fail, saying why)."""

    rate_limited = False

    def send(self, messages: list[dict]) -> list[Outcome]:
        raise Rejected("FCM is not configured (FCM_PROJECT_ID, FCM_SERVICE_ACCOUNT_JSON): no FCM pushes")


class OutboxClient:
    """Development: each message is a JSON file `fcm-<kind>-<invitation id>-<8 hex>.json` in `folder`."""

    rate_limited = False

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path_for(self, body: dict, ticket: str) -> Path:
        data = body["message"]["data"]
        return self.folder / f"fcm-{data['kind']}-{data['invitation_id']}-{ticket[-8:]}.json"

    def send(self, messages: list[dict]) -> list[Outcome]:
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for body in messages:
            ticket = f"outbox-{uuid.uuid4().hex}"
            self.path_for(body, ticket).write_text(json.dumps(body, indent=2))
            out.append(Sent(ticket))
        return out


def client_for(settings):
    """FCM when FCM_PROJECT_ID and FCM_SERVICE_ACCOUNT_JSON are set; else nothing in production, the
    development outbox elsewhere."""
    if settings.fcm_configured:
        info = service_account_info(settings.fcm_service_account_json.get_secret_value())
        return FcmClient(settings.fcm_project_id, info, settings.fcm_url, settings.fcm_token_url)
    if settings.is_production:
        return NotConfigured()
    return OutboxClient(Path(settings.callflow_outbox_dir) / "push")


class FcmChannel(PushChannel):
    name = names.CHANNEL_FCM
    queue = names.CHANNEL_QUEUES[name]
    provider_name = "fcm"
    batch_size = BATCH_SIZE

    def __init__(self, client, provider: Provider, database_url: str) -> None:
        self.client, self.provider, self.database_url = client, provider, database_url
        self.limited = client.rate_limited  # the development outbox has no rate and no retry loop

    @classmethod
    def from_settings(cls, settings) -> "FcmChannel":
        return cls(client_for(settings), fcm_provider(settings), settings.database_url)

    def compose(self, row: Record, now: datetime) -> dict:
        return compose(row, now)

    def send(self, messages: list[dict]):
        try:
            return self.client.send(messages)  # nothing of a batch answered: the loop's to say
        except TokenUnavailable as exc:
            raise Unavailable(str(exc)) from None
        except TokenRefused as exc:
            raise Rejected(str(exc)) from None

    def describe_sent(self, row: Record, message: dict, result: Sent) -> dict:
        if self.limited or not hasattr(self.client, "path_for"):
            return {"kind": row.kind}
        # Development: say where the message went.
        return {"kind": row.kind, "path": str(self.client.path_for(message, result.provider_id or ""))}
