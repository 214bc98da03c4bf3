"""A stand-in for APNs (Apple Push Notification service) for VoIP pushes, reached through `APNS_URL`.

It speaks real HTTP/2 over plain TCP with prior knowledge (h2c, the `h2` library over a socket
server, a thread per connection), as callflow's client speaks to an `http://` APNS_URL.

Covers (after ../shared/PROTOCOLS.md, "APNs VoIP pushes", and Apple's "Sending notification
requests to APNs"):
- `POST /3/device/<device token>` only (404 `BadPath`, 405 `MethodNotAllowed`); a token that is not
  64 hex characters: 400 `BadDeviceToken`;
- the provider token: `authorization: bearer <JWT>` (403 `MissingProviderToken`), ES256 signature
  checked with the public half of the test's key, header `kid` the key id and claim `iss` the team id
  (403 `InvalidProviderToken`), `iat` present and at most an hour old (403 `ExpiredProviderToken`);
  `expire_seen_tokens()` makes every token seen so far expired, as APNs does once they are old;
- the headers of a VoIP push: `apns-push-type: voip` (400 `InvalidPushType`), `apns-topic` present
  (400 `MissingTopic`) and ending in `.voip` / equal to `<topic>.voip` when `topic` is given (400
  `DeviceTokenNotForTopic`), `apns-priority: 10` (400 `BadPriority`), `apns-expiration` present, an
  integer (400 `BadExpirationDate`), `apns-collapse-id` at most 64 bytes (400 `BadCollapseId`),
  `apns-id` a UUID when given (400 `BadMessageId`); the body a JSON object (400 `PayloadEmpty` /
  `BadPayload`) of at most 5120 bytes (413 `PayloadTooLarge`);
- answers: 200 with the `apns-id` (the request's, or a new one), else `{"reason": ...}`; scripted
  per token (`answer_token(token, status, reason, times)`) or for the next requests
  (`script(410, 429, (403, "ExpiredProviderToken"), ...)`): 400 `BadDeviceToken`, 403
  `ExpiredProviderToken`, 410 `Unregistered` with `timestamp` (ms), 429 `TooManyRequests`, 500
  `InternalServerError`, 503 `ServiceUnavailable`, or any (status, reason) pair. Checks of the
  request come first, then the script (as APNs checks the token before anything else);
- records every request (arrival time, connection number, stream, token, headers, payload, the
  JWT used, the answer and when), the distinct JWTs and the TCP connections it saw;
- `delay`: every answer that many seconds late, each stream answered on its own (so requests sent
  at once over one connection are answered together, as APNs multiplexes them).

Does not cover: TLS and ALPN (callflow's client speaks h2c to an `http://` URL; the production
host is https), delivery to devices, `TooManyProviderTokenUpdates` (how often new tokens are
made is the test's to count), APNs's flow-control quirks, `GOAWAY` on idle connections, other push
types (alert, background) and their headers, the `apns-unique-id` header of the sandbox.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import jwt
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset

MAX_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64
TOKEN_MAX_AGE = 3600
DEFAULT_REASONS = {400: "BadDeviceToken", 403: "ExpiredProviderToken", 410: "Unregistered",
                   429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}
_TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass
class ApnsRequest:
    at: float                 # time.monotonic() of its arrival
    connection: int           # which TCP connection (1, 2, ...)
    stream: int
    method: str
    path: str
    token: str | None
    headers: dict[str, str]
    body: bytes
    jwt: str | None
    status: int = 0
    reason: str | None = None
    apns_id: str | None = None
    answered_at: float = 0.0  # time.monotonic() of its answer

    @property
    def payload(self) -> dict | None:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass
class ApnsStandin:
    public_key: object                    # the public half of the provider's P-256 key
    key_id: str
    team_id: str
    topic: str | None = None              # the app's bundle id: the topic must be `<topic>.voip`
    delay: float = 0.0                    # each answer this late (streams answered at once, not in turn)
    requests: list[ApnsRequest] = field(default_factory=list)
    jwts: list[str] = field(default_factory=list)   # distinct JWTs, in the order first seen

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[tuple[int, str]] = deque()
        self._per_token: dict[str, deque[tuple[int, str]]] = {}
        self._expired: set[str] = set()
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopping = False

    # ---- test controls -----------------------------------------------------------------------
    @staticmethod
    def _answer(item) -> tuple[int, str]:
        if isinstance(item, tuple):
            return int(item[0]), str(item[1])
        return int(item), DEFAULT_REASONS.get(int(item), "InternalServerError")

    def script(self, *answers) -> None:
        """The next requests' answers (status, or (status, reason)), in order, whatever their token."""
        with self._lock:
            self._script.extend(self._answer(a) for a in answers)

    def answer_token(self, token: str, status: int, reason: str | None = None, times: int = 1) -> None:
        """The next `times` requests to `token` get this answer."""
        with self._lock:
            self._per_token.setdefault(token, deque()).extend(
                [self._answer((status, reason)) if reason else self._answer(status)] * times)

    def expire_seen_tokens(self) -> None:
        """Every provider token seen so far is refused from now on (403 ExpiredProviderToken)."""
        with self._lock:
            self._expired.update(self.jwts)

    @property
    def connections(self) -> int:
        return self._connections

    def delivered(self, token: str | None = None) -> list[ApnsRequest]:
        """The requests answered 200 (to `token`), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.status == 200 and (token is None or r.token == token)]

    def to(self, token: str) -> list[ApnsRequest]:
        with self._lock:
            return [r for r in self.requests if r.token == token]

    # ---- the server --------------------------------------------------------------------------
    def start(self) -> "ApnsStandin":
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="apns-standin", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> "ApnsStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
                self._sockets.add(sock)
            threading.Thread(target=self._serve, args=(sock, number), name=f"apns-conn-{number}",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        streams: dict[int, tuple[dict, bytearray]] = {}
        wire = threading.Lock()  # the connection's state and socket: the reader's and the late answers'

        def answer_late(stream: int, headers: dict, body: bytes, arrived: float) -> None:
            time.sleep(self.delay)
            try:
                with wire:
                    self._respond(conn, number, stream, headers, body, arrived)
                    sock.sendall(conn.data_to_send())
            except Exception:  # noqa: BLE001 - the connection went meanwhile
                pass

        try:
            with wire:
                sock.sendall(conn.data_to_send())
            while True:
                data = sock.recv(65535)
                if not data:
                    return
                with wire:
                    events = conn.receive_data(data)
                for event in events:
                    if isinstance(event, RequestReceived):
                        streams[event.stream_id] = ({k: v for k, v in event.headers}, bytearray())
                    elif isinstance(event, DataReceived):
                        if event.stream_id in streams:
                            streams[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded):
                        if event.stream_id in streams:
                            headers, body = streams.pop(event.stream_id)
                            if self.delay > 0:
                                threading.Thread(target=answer_late, daemon=True,
                                                 args=(event.stream_id, headers, bytes(body), time.monotonic())).start()
                            else:
                                with wire:
                                    self._respond(conn, number, event.stream_id, headers, bytes(body), time.monotonic())
                    elif isinstance(event, StreamReset):
                        streams.pop(event.stream_id, None)
                    elif isinstance(event, ConnectionTerminated):
                        with wire:
                            sock.sendall(conn.data_to_send())
                        return
                with wire:
                    out = conn.data_to_send()
                    if out:
                        sock.sendall(out)
        except OSError:
            return
        finally:
            with self._lock:
                self._sockets.discard(sock)
            sock.close()

    def _respond(self, conn: H2Connection, number: int, stream: int, headers: dict, body: bytes,
                 arrived: float) -> None:
        path = headers.get(":path", "")
        token = path[len("/3/device/"):] if path.startswith("/3/device/") else None
        auth = headers.get("authorization", "")
        provider_jwt = auth[len("bearer "):].strip() if auth.lower().startswith("bearer ") else None
        record = ApnsRequest(arrived, number, stream, headers.get(":method", ""), path, token,
                             {k: v for k, v in headers.items() if not k.startswith(":")}, body, provider_jwt)
        status, reason = self._check(record)
        with self._lock:
            if provider_jwt and provider_jwt not in self.jwts:
                self.jwts.append(provider_jwt)
            if status == 200:
                queue = self._per_token.get(token or "")
                if queue:
                    status, reason = queue.popleft()
                elif self._script:
                    status, reason = self._script.popleft()
            record.status, record.reason = status, (reason if status != 200 else None)
            record.answered_at = time.monotonic()
            if status == 200:
                record.apns_id = headers.get("apns-id") or str(uuid.uuid4())
            self.requests.append(record)
        if status == 200:
            conn.send_headers(stream, [(":status", "200"), ("apns-id", record.apns_id)], end_stream=True)
            return
        answer = {"reason": reason}
        if status == 410:
            answer["timestamp"] = int(time.time() * 1000)
        data = json.dumps(answer).encode()
        response = [(":status", str(status)), ("content-type", "application/json"), ("content-length", str(len(data)))]
        if headers.get("apns-id"):
            response.append(("apns-id", headers["apns-id"]))
        conn.send_headers(stream, response)
        conn.send_data(stream, data, end_stream=True)

    def _check(self, r: ApnsRequest) -> tuple[int, str | None]:
        """What APNs would refuse in the request itself (its token first), or 200."""
        if r.method != "POST":
            return 405, "MethodNotAllowed"
        if r.token is None:
            return 404, "BadPath"
        if not r.jwt:
            return 403, "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(r.jwt)
            claims = jwt.decode(r.jwt, self.public_key, algorithms=["ES256"],
                                options={"require": ["iss", "iat"], "verify_iat": False})
        except jwt.PyJWTError:
            return 403, "InvalidProviderToken"
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return 403, "InvalidProviderToken"
        with self._lock:
            expired = r.jwt in self._expired
        if expired or not isinstance(claims.get("iat"), int) or time.time() - claims["iat"] > TOKEN_MAX_AGE:
            return 403, "ExpiredProviderToken"
        h = r.headers
        if h.get("apns-push-type") != "voip":
            return 400, "InvalidPushType"
        topic = h.get("apns-topic")
        if not topic:
            return 400, "MissingTopic"
        if not topic.endswith(".voip") or (self.topic is not None and topic != f"{self.topic}.voip"):
            return 400, "DeviceTokenNotForTopic"
        if h.get("apns-priority") != "10":
            return 400, "BadPriority"
        if not re.fullmatch(r"\d+", h.get("apns-expiration", "")):
            return 400, "BadExpirationDate"
        if len(h.get("apns-collapse-id", "").encode()) > MAX_COLLAPSE_ID:
            return 400, "BadCollapseId"
        if "apns-id" in h and not _UUID.match(h["apns-id"]):
            return 400, "BadMessageId"
        if not r.body:
            return 400, "PayloadEmpty"
        if len(r.body) > MAX_PAYLOAD:
            return 413, "PayloadTooLarge"
        if not isinstance(r.payload, dict):
            return 400, "BadPayload"
        if not _TOKEN.match(r.token):
            return 400, "BadDeviceToken"
        return 200, None
