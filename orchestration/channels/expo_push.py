"""The Expo push channel: `push_messages` rows of Expo devices (`provider` `expo`) through Expo's push
API (or JSON files in development), in batches of up to 100. The rules of every push (deadline,
shares, disabled devices) are `orchestration.push.channel.PushChannel`'s.

What is Expo's own: `DeviceNotRegistered` turns the device off (in the ticket, or later in the
receipt the sweep reads); a `MessageRateExceeded` ticket is no answer for that message. A send cut off by a crash before its
tickets were stored is sent again; the app drops the duplicate by `kind` + `invitation_id`.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from orchestration import names
from orchestration.db import get_pool
from orchestration.delivery.channel import NoAnswer, Provider, Record, Refused, Rejected, Sent, Unavailable
from orchestration.push.channel import PushChannel
from orchestration.push.expo import MAX_BATCH, client_for, MAX_RECEIPTS, TIMEOUT_SECONDS, ExpoRejected, ExpoUnavailable
from orchestration.push.messages import expo_message
from orchestration.shared_backoff import SharedBackoff

log = structlog.get_logger("callflow.push")

DEVICE_GONE = "DeviceNotRegistered"
RATE_EXCEEDED = "MessageRateExceeded"  # a ticket that is Expo's 429 for one message: not an answer
# Expo unavailable: the wait before the next try, from 0.5 s up to 10 s (Expo takes 600 messages a
# second, so a batch every 10 s is nothing to it, and a ring that can still go is not kept waiting
# long once Expo is back).
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
RECEIPTS_AFTER = 15.0  # Expo's receipts are usually ready within seconds

def expo_provider(settings) -> Provider:
    return Provider(name="expo", rate_key=names.RATELIMIT_EXPO, rate_per_second=settings.callflow_push_rate_per_second,
                    retry_base_seconds=RETRY_BASE_SECONDS, retry_max_seconds=RETRY_MAX_SECONDS,
                    probe_seconds=TIMEOUT_SECONDS + 2)


class ExpoPushChannel(PushChannel):
    name = names.CHANNEL_EXPO
    queue = names.CHANNEL_QUEUES[name]
    provider_name = "expo"
    batch_size = MAX_BATCH

    def __init__(self, client, provider: Provider, database_url: str) -> None:
        self.client, self.provider, self.database_url = client, provider, database_url

    @classmethod
    def from_settings(cls, settings) -> "ExpoPushChannel":
        return cls(client_for(settings), expo_provider(settings), settings.database_url)

    def compose(self, row: Record, now: datetime) -> dict:
        return expo_message(row, now)

    def send(self, messages: list[dict]):
        try:
            tickets = self.client.send(messages)
        except ExpoUnavailable as exc:
            raise Unavailable(str(exc), exc.retry_after) from None
        except ExpoRejected as exc:
            raise Rejected(str(exc)) from None
        out = []
        for message, ticket in zip(messages, tickets):
            if ticket.ok:
                out.append(Sent(ticket.id))
            elif ticket.error == RATE_EXCEEDED:
                out.append(NoAnswer(f"{RATE_EXCEEDED}: Expo asked to slow down"))
            else:
                out.append(Refused((ticket.error or "error") + ": " + (ticket.message or ""),
                                   gone=message["to"] if ticket.error == DEVICE_GONE else None))
        return out

    def after_sweep(self, loop: SharedBackoff) -> dict:
        return {"receipts": self.check_receipts(loop)}

    def check_receipts(self, loop: SharedBackoff | None, older_than: float = RECEIPTS_AFTER,
                       limit: int = MAX_RECEIPTS) -> int:
        """Receipts of sent messages, in batches: ok or error; DeviceNotRegistered turns the device off."""
        with get_pool(self.database_url).connection() as conn:
            pending = [(str(r["id"]), r["ticket_id"], r["token"]) for r in conn.execute(
                """select m.id, m.ticket_id, t.token from public.push_messages m
                     join public.push_tokens t on t.id = m.push_token_id
                    where t.provider = 'expo' and m.status = 'sent' and m.receipt_status is null
                      and m.ticket_id is not null
                      and m.sent_at < now() - make_interval(secs => %s)
                      and m.sent_at > now() - interval '1 day'
                    order by m.sent_at limit %s""", (older_than, limit)).fetchall()]
            conn.commit()
            if not pending:
                return 0
            turn = loop.turn() if loop is not None else None
            if turn is not None and turn.wait > 0:  # Expo gave no answer lately: asked at a later sweep
                return 0
            try:
                receipts = self.client.receipts([ticket for _, ticket, _ in pending])
            except ExpoUnavailable as exc:
                if turn is not None:
                    loop.failed(turn, exc.retry_after)
                log.info("push: receipts not read, Expo unavailable", error=str(exc))
                return 0
            if turn is not None:
                loop.succeeded()
            recorded, gone = [], []
            for mid, ticket, token in pending:
                receipt = receipts.get(ticket)
                if receipt is None:
                    continue  # not ready yet: asked again next time
                if receipt.ok:
                    recorded.append((mid, "ok", None))
                else:
                    recorded.append((mid, "error", f"receipt: {receipt.error or receipt.message}"))
                    if receipt.error == DEVICE_GONE:
                        gone.append(token)
            self.forget(conn, gone)
            if recorded:
                conn.cursor().executemany(
                    """update public.push_messages set receipt_status = %s,
                              last_error = coalesce(%s, last_error) where id = %s""",
                    [(status, error, mid) for mid, status, error in recorded])
            conn.commit()
            return len(recorded)
