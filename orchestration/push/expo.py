"""Expo's push API (`{EXPO_PUSH_URL}/--/api/v2/push/send` and `.../getReceipts`), or, in
development without Expo settings, JSON files under `$CALLFLOW_OUTBOX_DIR/push/`."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

SEND_PATH = "/--/api/v2/push/send"
RECEIPTS_PATH = "/--/api/v2/push/getReceipts"
MAX_BATCH = 100
MAX_RECEIPTS = 1000
# Expo answers in well under a second; one that takes longer is no answer (the batch is tried again).
TIMEOUT_SECONDS = 10.0


class ExpoUnavailable(Exception):
    """Expo could not take the request now (connection error, 429, 5xx): try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ExpoRejected(Exception):
    """Expo refused the request itself (4xx other than 429): trying again will not help."""


@dataclass(frozen=True)
class Ticket:
    ok: bool
    id: str | None = None
    error: str | None = None    # details.error, e.g. DeviceNotRegistered
    message: str | None = None


def _ticket(raw: dict) -> Ticket:
    if raw.get("status") == "ok":
        return Ticket(True, id=raw.get("id"))
    details = raw.get("details") or {}
    return Ticket(False, error=details.get("error"), message=raw.get("message") or details.get("error"))


class ExpoClient:
    def __init__(self, base_url: str, access_token: str | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def _post(self, path: str, payload) -> dict:
        try:
            resp = self.http.post(self.base_url + path, json=payload)
        except httpx.HTTPError as exc:
            raise ExpoUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            retry = resp.headers.get("retry-after")
            raise ExpoUnavailable(f"Expo answered {resp.status_code}",
                                  float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
        if resp.status_code >= 400:
            raise ExpoRejected(f"Expo answered {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ExpoUnavailable("Expo answered with something that is not JSON") from exc

    def send(self, messages: list[dict]) -> list[Ticket]:
        """Up to 100 messages; one ticket per message, in the same order."""
        assert len(messages) <= MAX_BATCH
        tickets = self._post(SEND_PATH, messages).get("data")
        if not isinstance(tickets, list) or len(tickets) != len(messages):
            raise ExpoUnavailable("Expo's answer has no ticket per message")
        return [_ticket(t) for t in tickets]

    def receipts(self, ticket_ids: list[str]) -> dict[str, Ticket]:
        """Receipts of up to 1000 tickets; a ticket whose receipt is not ready yet is missing."""
        data = self._post(RECEIPTS_PATH, {"ids": ticket_ids}).get("data") or {}
        return {tid: _ticket(raw) for tid, raw in data.items() if isinstance(raw, dict)}


class OutboxClient:
    """Development: each message is a JSON file in `folder`; every ticket and receipt is ok."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def send(self, messages: list[dict]) -> list[Ticket]:
        self.folder.mkdir(parents=True, exist_ok=True)
        tickets = []
        for message in messages:
            ticket = f"outbox-{uuid.uuid4().hex}"
            name = f"{message['data']['kind']}-{message['data']['invitation_id']}-{ticket[-8:]}.json"
            (self.folder / name).write_text(json.dumps(message, indent=2, default=str))
            tickets.append(Ticket(True, id=ticket))
        return tickets

    def receipts(self, ticket_ids: list[str]) -> dict[str, Ticket]:
        return {tid: Ticket(True, id=tid) for tid in ticket_ids}


def client_for(settings):
    """Expo when configured (or in production), else the development outbox."""
    if settings.expo_push_configured:
        return ExpoClient(settings.expo_push_base_url, settings.expo_access_token.get_secret_value()
                          if settings.expo_access_token else None)
    return OutboxClient(Path(settings.callflow_outbox_dir) / "push")
