"""A stand-in for the Resend API, reached by the real `resend` SDK through `RESEND_API_URL`.

Covers (after ../shared/PROTOCOLS.md and Resend's API reference):
- `POST /emails`: `Authorization: Bearer re_…` required (401 `missing_api_key` without, 403
  `invalid_api_key` for another scheme); JSON body with `from`, `to`, `subject` and `html` or
  `text`, else 422 `missing_required_field`; 200 `{"id": "<uuid>"}` for an accepted email;
  error bodies `{"statusCode", "message", "name"}` as Resend sends them, which is what the SDK
  parses into its exceptions.
- `Idempotency-Key`: a key whose first request succeeded gets that first answer again, without a
  second email (`replayed` in the record), for as long as the server lives (Resend: 24 hours);
  the same key with a different body gets 409 `invalid_idempotent_request`; the same key while
  its first request is still in flight gets 409 `concurrent_idempotent_requests`; a request that
  failed does not use up its key.
- Answers on demand, in order (`script(...)`): 200 (optionally answered only after a delay, the
  email being accepted at arrival: the "worker killed mid-send" case), 429 with `retry-after`,
  500, 422; or for one recipient (`fail_recipient`). Optional account rate limit (`rate_limit`:
  429 `rate_limit_exceeded` with `retry-after` over N requests in the trailing second).
- Records every request (arrival time, headers, body, key, answer) for the tests to assert on;
  `ratelimit-*` headers on every answer.

Does not cover: delivery itself (no SMTP, bounces, webhooks or events), attachments, batch
sends, scheduled sends, tags/headers validation, daily/monthly quotas, key expiry after 24 hours,
the exact wording of Resend's messages, HTTP/2 or TLS.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    retry_after: float | None = None
    delay: float = 0.0  # seconds before answering (a 200 is accepted at arrival)
    name: str | None = None
    message: str | None = None


@dataclass
class Recorded:
    at: float  # time.time() at arrival
    path: str
    headers: dict
    body: dict | None
    idempotency_key: str | None
    status: int = 0
    replayed: bool = False
    email_id: str | None = None

    @property
    def to(self) -> list[str]:
        to = (self.body or {}).get("to")
        return [to] if isinstance(to, str) else list(to or [])


@dataclass
class _KeyState:
    body_hash: str
    in_flight: bool = True
    answer: tuple[int, dict] | None = None


_DEFAULT_NAMES = {
    400: "validation_error", 401: "missing_api_key", 403: "invalid_api_key", 404: "not_found",
    409: "concurrent_idempotent_requests", 422: "validation_error", 429: "rate_limit_exceeded",
    500: "application_error", 502: "application_error", 503: "application_error",
}


class ResendStandIn:
    def __init__(self, rate_limit: int | None = None) -> None:
        self.rate_limit = rate_limit
        self.requests: list[Recorded] = []
        self.emails: list[Recorded] = []  # accepted, not replayed: what a person would receive
        self._script: deque[Answer] = deque()
        self._fail_recipients: dict[str, Answer] = {}
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control -------------------------------------------------------------------------------
    def start(self) -> "ResendStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                standin._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                standin._reply(self, 405, {"statusCode": 405, "message": "Method not allowed", "name": "method_not_allowed"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="resend-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.emails.clear()
            self._script.clear()
            self._fail_recipients.clear()
            self._keys.clear()
            self.rate_limit = None

    def script(self, *answers: Answer | int) -> None:
        """The next new (not replayed) requests get these answers, in order; then 200s."""
        with self._lock:
            for a in answers:
                self._script.append(a if isinstance(a, Answer) else Answer(status=a))

    def fail_recipient(self, address: str, answer: Answer | int) -> None:
        with self._lock:
            self._fail_recipients[address.lower()] = answer if isinstance(answer, Answer) else Answer(status=answer)

    def emails_to(self, address: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.emails if address.lower() in (t.lower() for t in r.to)]

    def requests_to(self, address: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if address.lower() in (t.lower() for t in r.to)]

    # ---- the API -------------------------------------------------------------------------------
    def _reply(self, handler: BaseHTTPRequestHandler, status: int, body: dict,
               retry_after: float | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ratelimit-limit", str(self.rate_limit or 2))
        handler.send_header("ratelimit-policy", f"{self.rate_limit or 2};w=1")
        if retry_after is not None:
            handler.send_header("retry-after", f"{retry_after:g}")
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed worker): the answer is still the answer

    @staticmethod
    def _error(status: int, name: str | None = None, message: str | None = None) -> dict:
        name = name or _DEFAULT_NAMES.get(status, "application_error")
        return {"statusCode": status, "message": message or name.replace("_", " "), "name": name}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        arrived = time.time()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        key = handler.headers.get("Idempotency-Key")
        rec = Recorded(arrived, handler.path, dict(handler.headers.items()), body if isinstance(body, dict) else None, key)
        with self._lock:
            self.requests.append(rec)

        def finish(status: int, payload: dict, retry_after: float | None = None) -> None:
            rec.status = status
            self._reply(handler, status, payload, retry_after)

        if handler.path.rstrip("/") != "/emails":
            return finish(404, self._error(404, "not_found", "route not found"))
        auth = handler.headers.get("Authorization", "")
        if not auth:
            return finish(401, self._error(401, "missing_api_key", "Missing API key in the authorization header"))
        if not auth.startswith("Bearer re_"):
            return finish(403, self._error(403, "invalid_api_key", "API key is invalid"))
        if not isinstance(body, dict):
            return finish(422, self._error(422, "validation_error", "Invalid JSON body"))
        missing = [f for f in ("from", "to", "subject") if not body.get(f)]
        if not (body.get("html") or body.get("text")):
            missing.append("html or text")
        if missing:
            return finish(422, self._error(422, "missing_required_field", f"Missing `{missing[0]}` field."))

        body_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            state = self._keys.get(key) if key else None
            if state is not None:
                if state.body_hash != body_hash:
                    replay = (409, self._error(409, "invalid_idempotent_request",
                                               "Same idempotency key used with a different request payload"))
                elif state.in_flight:
                    replay = (409, self._error(409, "concurrent_idempotent_requests",
                                               "Same idempotency key used while original request is still in progress"))
                else:
                    replay = state.answer
                    rec.replayed = True
                    rec.email_id = replay[1].get("id")
            else:
                replay = None
            if replay is None:
                answer = self._next_answer(rec, arrived)
                if answer.status == 200 and key:
                    self._keys[key] = _KeyState(body_hash)
                if answer.status == 200:
                    rec.email_id = str(uuid.uuid4())
                    self.emails.append(rec)  # accepted at arrival, whether or not the answer arrives
        if replay is not None:
            return finish(*replay)
        if answer.delay:
            time.sleep(answer.delay)
        if answer.status == 200:
            payload = {"id": rec.email_id}
            with self._lock:
                if key:
                    self._keys[key].answer = (200, payload)
                    self._keys[key].in_flight = False
            return finish(200, payload)
        retry_after = answer.retry_after
        if answer.status == 429 and retry_after is None:
            retry_after = 1
        return finish(answer.status, self._error(answer.status, answer.name, answer.message), retry_after)

    def _next_answer(self, rec: Recorded, arrived: float) -> Answer:
        for address in rec.to:
            if address.lower() in self._fail_recipients:
                return self._fail_recipients[address.lower()]
        if self.rate_limit is not None:
            recent = [r for r in self.requests if arrived - 1.0 < r.at <= arrived and r is not rec and r.status != 429]
            if len(recent) >= self.rate_limit:
                return Answer(429, retry_after=1)
        if self._script:
            return self._script.popleft()
        return Answer(200)
