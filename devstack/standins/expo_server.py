"""A stand-in for Expo's push API, reached through `EXPO_PUSH_URL`.

Covers (after ../shared/PROTOCOLS.md, "Expo push", and docs.expo.dev sending-notifications):
- `POST /--/api/v2/push/send`: a JSON list of up to 100 messages (400 `PUSH_TOO_MANY_NOTIFICATIONS`
  over 100, 400 for a body that is not a list of objects with `to`); answers
  `{"data": [ticket, ...]}` in the same order: `{"status": "ok", "id": <receipt id>}`, or
  `{"status": "error", "message", "details": {"error": "DeviceNotRegistered"}}` for a token
  marked unregistered (`unregister(token)`), or a token that is not an Expo push token.
- `POST /--/api/v2/push/getReceipts`: `{"ids": [...]}` (up to 1000) → `{"data": {id: receipt}}`,
  only for receipts older than `receipt_delay` seconds (Expo's arrive later); a token marked
  `unregister_later(token)` gets an ok ticket and a `DeviceNotRegistered` receipt.
- Whole-request failures on demand, in order (`script(500, 429, ...)`), or for a period
  (`down_for(seconds)`: 503 until then); `Authorization: Bearer <token>` checked when
  `access_token` is set (401 otherwise); a `MessageRateExceeded` error ticket for the next n
  messages to a token (`rate_exceed(token, n)`: Expo's 429 for one message).
- Records every send request (arrival time, messages, answer) for the tests to assert on.

Does not cover: delivery to devices, APNs/FCM credentials, message size limits, `expiration`
handling, the exact wording of Expo's messages, HTTP/2, gzip request bodies, Expo's own rate limit.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class SendRecord:
    at: float
    messages: list
    status: int


@dataclass
class ExpoStandin:
    access_token: str | None = None
    receipt_delay: float = 0.0
    sends: list[SendRecord] = field(default_factory=list)
    unregistered: set[str] = field(default_factory=set)
    unregistered_later: set[str] = field(default_factory=set)
    receipts: dict[str, tuple[float, dict]] = field(default_factory=dict)
    receipt_requests: list[list[str]] = field(default_factory=list)
    rate_exceeded: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._script: deque[int] = deque()
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # ---- test controls --------------------------------------------------------------------
    def script(self, *statuses: int) -> None:
        with self._lock:
            self._script.extend(statuses)

    def down_for(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds

    def unregister(self, token: str) -> None:
        self.unregistered.add(token)

    def unregister_later(self, token: str) -> None:
        self.unregistered_later.add(token)

    def rate_exceed(self, token: str, times: int = 1) -> None:
        with self._lock:
            self.rate_exceeded[token] = times

    def delivered(self, kind: str | None = None) -> list[dict]:
        """Every message answered with an ok ticket (in arrival order)."""
        out = []
        for record in self.sends:
            if record.status == 200:
                out += [m for m in record.messages
                        if m.get("to") not in self.unregistered and (kind is None or m["data"]["kind"] == kind)]
        return out

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- the server -----------------------------------------------------------------------
    def start(self) -> "ExpoStandin":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if standin.access_token and self.headers.get("Authorization") != f"Bearer {standin.access_token}":
                    return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad access token"}]})
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    return self._answer(400, {"errors": [{"code": "VALIDATION_ERROR", "message": "not JSON"}]})
                if self.path == "/--/api/v2/push/send":
                    return standin._send(self, body)
                if self.path == "/--/api/v2/push/getReceipts":
                    return standin._get_receipts(self, body)
                return self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": self.path}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> "ExpoStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _send(self, handler, body) -> None:
        now = time.time()
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        messages = body if isinstance(body, list) else []
        if scripted is None and time.monotonic() < self._down_until:
            scripted = 503
        if scripted is not None and scripted != 200:
            self.sends.append(SendRecord(now, messages, scripted))
            return handler._answer(scripted, {"errors": [{"code": "INTERNAL_SERVER_ERROR" if scripted >= 500
                                                          else "TOO_MANY_REQUESTS", "message": "scripted"}]})
        if not isinstance(body, list) or not all(isinstance(m, dict) and "to" in m for m in body):
            self.sends.append(SendRecord(now, messages, 400))
            return handler._answer(400, {"errors": [{"code": "VALIDATION_ERROR", "message": "a list of messages"}]})
        if len(body) > 100:
            self.sends.append(SendRecord(now, messages, 400))
            return handler._answer(400, {"errors": [{"code": "PUSH_TOO_MANY_NOTIFICATIONS",
                                                     "message": "at most 100 messages"}]})
        tickets = []
        delivered = []
        for message in body:
            token = message["to"]
            with self._lock:
                over_rate = self.rate_exceeded.get(token, 0) > 0
                if over_rate:
                    self.rate_exceeded[token] -= 1
            if over_rate:
                tickets.append({"status": "error", "message": "too many messages to this device",
                                "details": {"error": "MessageRateExceeded"}})
                continue
            delivered.append(message)
            if token in self.unregistered or not str(token).startswith(("ExponentPushToken[", "ExpoPushToken[")):
                tickets.append({"status": "error", "message": f'"{token}" is not a registered push notification recipient',
                                "details": {"error": "DeviceNotRegistered", "expoPushToken": token}})
                continue
            receipt_id = str(uuid.uuid4())
            receipt = ({"status": "error", "message": "The device is not registered",
                        "details": {"error": "DeviceNotRegistered"}} if token in self.unregistered_later
                       else {"status": "ok"})
            self.receipts[receipt_id] = (now, receipt)
            tickets.append({"status": "ok", "id": receipt_id})
        self.sends.append(SendRecord(now, delivered, 200))  # a rate-exceeded message never reached its device
        handler._answer(200, {"data": tickets})

    def _get_receipts(self, handler, body) -> None:
        ids = (body or {}).get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) > 1000:
            return handler._answer(400, {"errors": [{"code": "VALIDATION_ERROR", "message": "ids: up to 1000"}]})
        self.receipt_requests.append(ids)
        ready = time.time() - self.receipt_delay
        handler._answer(200, {"data": {i: self.receipts[i][1] for i in ids
                                       if i in self.receipts and self.receipts[i][0] <= ready}})
