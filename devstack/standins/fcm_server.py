"""A stand-in for FCM HTTP v1 and Google's OAuth token endpoint, reached through `FCM_URL` and
`FCM_TOKEN_URL` (`url` and `token_url`).

Covers (after ../shared/PROTOCOLS.md, "FCM HTTP v1", and firebase.google.com cloud-messaging
send/v1-api and error codes):
- `POST /token`, form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`: the
  assertion is verified (RS256) with the public key of the service account its `iss` names
  (`add_account(client_email, public_key)`); `aud` must be `token_url`, `scope` must include
  firebase.messaging, `exp` ≤ `iat` + 3600 and not past. Answers `{"access_token", "expires_in",
  "token_type": "Bearer"}` (`token_lifetime`, 3599 s by default), else 400 `{"error":
  "invalid_grant" | "unsupported_grant_type", "error_description"}`. Every request and token issued
  is recorded (`token_requests`, `tokens_issued`); scripted failures with `fail_token(status, n)`.
- `POST /v1/projects/<project>/messages:send`: `Authorization: Bearer <a token it issued, not
  expired, not revoked>` (else 401 UNAUTHENTICATED), the project (else 404 NOT_FOUND), a JSON body
  `{"message": {"token", "data", "android"}}` with every `data` value a string, `android.ttl` in
  FCM's duration form (`"<seconds>s"`, ≤ 28 days) and `android.priority` NORMAL or HIGH (else 400
  INVALID_ARGUMENT). Checks of callflow's contract, not FCM's, refused the same way when
  `contract` (default): `android.priority` HIGH, no `notification` (data-only), `collapse_key` set.
  Answers `{"name": "projects/<project>/messages/<id>"}`.
- Errors in FCM's shape: `{"error": {"code", "message", "status", "details": [{"@type":
  "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode"}]}}`, scripted per device
  token or for the next n messages (`fail(status, times, token=..., retry_after=...)`): 400
  INVALID_ARGUMENT, 401 UNAUTHENTICATED (no FcmError; the access token presented is revoked, so a
  client must fetch another), 403 SENDER_ID_MISMATCH, 404 UNREGISTERED, 429 QUOTA_EXCEEDED (with
  `Retry-After`), 500 INTERNAL, 503 UNAVAILABLE; a device token marked gone (`unregister(token)`)
  is 404 UNREGISTERED for good.
- Records every send (`sends`: arrival time, device token, body, status, access token, the client's
  connection) for the tests to assert on; `delivered(kind)` the messages answered 200.

Does not cover: delivery to devices (or any device-side rule: collapse, ttl expiry, Doze), topics,
conditions, `validate_only`, APNs/web configs, message size limits (4 KB data), FCM's own quotas,
HTTP/2 (it speaks HTTP/1.1 with keep-alive; FCM speaks both), TLS, the token endpoint's other grants,
Google's key rotation (`kid` is not checked against published certificates), the batch endpoint
(retired by Google).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
TTL_SHAPE = re.compile(r"^\d+(\.\d{1,9})?s$")
MAX_TTL_SECONDS = 28 * 24 * 3600
SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")

# status -> (the error's status, FcmError errorCode or None, message)
ERRORS = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", None, "Request had invalid authentication credentials. Expected OAuth 2 access token."),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for quota metric 'Send requests'."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}


def error_body(status: int, message: str | None = None, code: str | None = "default") -> dict:
    grpc, fcm_code, default = ERRORS.get(status, ("UNKNOWN", None, "error"))
    fcm_code = fcm_code if code == "default" else code
    error = {"code": status, "message": message or default, "status": grpc}
    if fcm_code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}]
    return {"error": error}


@dataclass
class SendRecord:
    at: float                 # time.monotonic() at arrival
    token: str | None         # the device token
    body: dict | None
    status: int
    access_token: str | None
    peer: tuple               # the client's address: one per kept-alive connection

    @property
    def message(self) -> dict:
        return (self.body or {}).get("message") or {}


@dataclass
class TokenRecord:
    at: float
    claims: dict | None
    status: int
    error: str | None = None


@dataclass
class Scripted:
    status: int
    retry_after: float | None = None


@dataclass
class FcmStandin:
    project_id: str = "callflow-test"
    token_lifetime: int = 3599
    contract: bool = True
    accounts: dict[str, object] = field(default_factory=dict)   # client_email -> public key
    sends: list[SendRecord] = field(default_factory=list)
    token_requests: list[TokenRecord] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    unregistered: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}        # access token -> monotonic expiry
        self._revoked: set[str] = set()
        self._next: deque[Scripted] = deque()      # for the next messages, whatever their device
        self._per_device: dict[str, deque[Scripted]] = {}
        self._token_failures: deque[int] = deque()
        self.server: ThreadingHTTPServer | None = None

    # ---- test controls --------------------------------------------------------------------------
    def add_account(self, client_email: str, public_key) -> None:
        self.accounts[client_email] = public_key

    def fail(self, status: int, times: int = 1, token: str | None = None, retry_after: float | None = None) -> None:
        """The next `times` messages (to `token`, or to anyone) get `status` in FCM's error shape."""
        with self._lock:
            line = self._per_device.setdefault(token, deque()) if token else self._next
            line.extend(Scripted(status, retry_after) for _ in range(times))

    def unregister(self, token: str) -> None:
        self.unregistered.add(token)

    def fail_token(self, status: int, times: int = 1) -> None:
        """The token endpoint's next `times` answers: `status` (400 invalid_grant, 5xx, 429)."""
        with self._lock:
            self._token_failures.extend([status] * times)

    def revoke_all(self) -> None:
        with self._lock:
            self._revoked.update(self._expiry)

    def delivered(self, kind: str | None = None, token: str | None = None) -> list[dict]:
        """The messages answered 200, in arrival order."""
        return [r.message for r in self.sends if r.status == 200
                and (kind is None or r.message.get("data", {}).get("kind") == kind)
                and (token is None or r.token == token)]

    def answered(self, token: str) -> list[int]:
        return [r.status for r in self.sends if r.token == token]

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    # ---- the server -----------------------------------------------------------------------------
    def start(self) -> "FcmStandin":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as FCM's clients expect

            def log_message(self, *args):  # quiet
                pass

            def answer(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/token":
                    return standin._token(self, raw)
                match = SEND_PATH.match(self.path)
                if match:
                    return standin._send(self, match.group(1), raw)
                return self.answer(404, error_body(404, f"no such path: {self.path}", code=None))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> "FcmStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the token endpoint ---------------------------------------------------------------------
    def _token(self, handler, raw: bytes) -> None:
        now = time.monotonic()
        form = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace")).items()}

        def refuse(status: int, error: str, description: str, claims=None) -> None:
            self.token_requests.append(TokenRecord(now, claims, status, f"{error}: {description}"))
            handler.answer(status, {"error": error, "error_description": description})

        with self._lock:
            scripted = self._token_failures.popleft() if self._token_failures else None
        if scripted is not None:
            return refuse(scripted, "invalid_grant" if scripted < 500 and scripted != 429 else "internal_failure",
                          "scripted")
        if form.get("grant_type") != GRANT_TYPE:
            return refuse(400, "unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')}")
        assertion = form.get("assertion") or ""
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            return refuse(400, "invalid_grant", f"Invalid JWT: {exc}")
        key = self.accounts.get(unverified.get("iss"))
        if key is None:
            return refuse(400, "invalid_grant", f"Invalid JWT: unknown issuer {unverified.get('iss')!r}", unverified)
        if header.get("alg") != "RS256":
            return refuse(400, "invalid_grant", f"Invalid JWT: alg {header.get('alg')!r}, RS256 expected", unverified)
        try:
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=self.token_url,
                                options={"require": ["iss", "aud", "iat", "exp"]})
        except jwt.PyJWTError as exc:
            return refuse(400, "invalid_grant", f"Invalid JWT Signature or claims: {exc}", unverified)
        if claims["exp"] - claims["iat"] > 3600:
            return refuse(400, "invalid_grant", "Invalid JWT: lifetime over one hour", claims)
        if SCOPE not in str(claims.get("scope") or "").split():
            return refuse(400, "invalid_scope", f"the scope must include {SCOPE}", claims)
        access_token = f"ya29.standin-{uuid.uuid4().hex}"
        with self._lock:
            self._expiry[access_token] = now + self.token_lifetime
            self.tokens_issued.append(access_token)
            self.token_requests.append(TokenRecord(now, claims, 200))
        handler.answer(200, {"access_token": access_token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    # ---- messages:send --------------------------------------------------------------------------
    def _invalid(self, body) -> str | None:
        """Why a send body is refused with 400 INVALID_ARGUMENT, or None."""
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return "Invalid JSON payload: 'message' is required"
        if not isinstance(message.get("token"), str) or not message["token"]:
            return "Exactly one of token, topic or condition must be specified"
        data = message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            return "Invalid value at 'message.data': every value must be a string"
        android = message.get("android", {})
        if not isinstance(android, dict):
            return "Invalid value at 'message.android'"
        if android.get("priority", "NORMAL") not in ("NORMAL", "HIGH", "normal", "high"):
            return f"Invalid value at 'message.android.priority': {android.get('priority')!r}"
        ttl = android.get("ttl")
        if ttl is not None and (not isinstance(ttl, str) or not TTL_SHAPE.match(ttl)
                                or float(ttl[:-1]) > MAX_TTL_SECONDS):
            return f"Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration): {ttl!r}"
        if self.contract:
            if android.get("priority") != "HIGH":
                return "stand-in (callflow's contract): android.priority must be HIGH"
            if "notification" in message or "notification" in android:
                return "stand-in (callflow's contract): data-only, no notification"
            if not android.get("collapse_key"):
                return "stand-in (callflow's contract): android.collapse_key is the invitation id"
        return None

    def _send(self, handler, project: str, raw: bytes) -> None:
        now = time.monotonic()
        auth = handler.headers.get("Authorization") or ""
        access_token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        message = body.get("message") if isinstance(body, dict) else None
        device = message.get("token") if isinstance(message, dict) else None

        def answer(status: int, payload: dict, headers: dict | None = None) -> None:
            with self._lock:
                self.sends.append(SendRecord(now, device, body, status, access_token, handler.client_address))
            handler.answer(status, payload, headers)

        with self._lock:
            valid = (access_token in self._expiry and self._expiry[access_token] > now
                     and access_token not in self._revoked)
        if not valid:
            return answer(401, error_body(401, code=None))
        if project != self.project_id:
            return answer(404, error_body(404, f"Project {project!r} not found", code=None))
        why = self._invalid(body)
        if why:
            return answer(400, error_body(400, why))
        with self._lock:
            line = self._per_device.get(device)
            scripted = line.popleft() if line else (self._next.popleft() if self._next else None)
            if scripted is not None and scripted.status == 401:
                self._revoked.add(access_token)
        if scripted is not None and scripted.status != 200:
            headers = {"Retry-After": f"{scripted.retry_after:g}"} if scripted.retry_after is not None else None
            code = None if scripted.status == 401 else "default"  # a 401 carries no FcmError
            return answer(scripted.status, error_body(scripted.status, code=code), headers)
        if device in self.unregistered:
            return answer(404, error_body(404))
        answer(200, {"name": f"projects/{self.project_id}/messages/{uuid.uuid4().int % 10**19}"})
