"""What a channel is: the one interface every outbound channel (email, usage alert, Expo push, ...)
implements, and the answers its provider gives. The delivery loop (`loop.py`), the sweep
(`sweep.py`), the rate (`rate.py`) and the task pair (`workers/tasks/delivery.py`) are the same for
every channel; a channel says only what is its own:

- its outbox: a table with `id`, `status` (`pending`, `sent`, `failed`, `skipped`), `attempts`,
  `last_error`, `created_at`, `sent_at` and a column for the provider's id of a sent message;
- `load`: the rows with everything their messages need;
- `skip_reason`: why a row gets no message (opted out, no longer of use), asked as it goes;
- `compose`: the message of a row (a pure function of the row: the same on every attempt);
- `send`: one request to the provider for a batch, answered per message (`Sent`, `Refused`,
  `NoAnswer`), or `Unavailable` (no answer: never a failure) / `Rejected` (the request refused);
- its rate and its provider's retry loop (`Provider`), its batch size, its expiry, and whether
  each recipient gets a share of the rate (`share_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence


class Record(dict):
    """A row as a dict whose columns read as attributes too (`row.id`, `row["id"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Sent:
    provider_id: str | None


@dataclass(frozen=True)
class Refused:
    """The provider refused this message: trying again will not help (`failed`). `gone`: an address
    the provider says no longer exists (a device token), which the channel turns off."""

    error: str
    gone: str | None = None


@dataclass(frozen=True)
class NoAnswer:
    """No answer for this message (Expo's MessageRateExceeded ticket; a 429, a 5xx or a timeout of a
    provider that takes one request per message): it goes again. `retry_after`: what the provider
    asked; `rate_limited`: it was a 429. When not one message of a batch was answered, the loop takes
    it as the provider giving no answer (`none_answered`)."""

    error: str
    retry_after: float | None = None
    rate_limited: bool = False


Result = Sent | Refused | NoAnswer


# A request of several over one HTTP/2 connection (httpx, threads) whose connection ends while it
# waits can raise KeyError (its stream's events gone) instead of the connection's own error
# (encode/httpx#3072, open upstream): a channel takes it as no answer, like the error it stands for.
HTTP2_LOST_STREAM: tuple[type[Exception], ...] = (KeyError,)


class Unavailable(Exception):
    """The provider gave no answer (connection refused or reset, a timeout, 429, 5xx): the messages
    stay `pending` and go again when its retry loop says. `retry_after`: what the provider asked."""

    def __init__(self, message: str, retry_after: float | None = None, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limited = rate_limited  # a 429: everybody holds off for retry_after


def none_answered(answers: list[NoAnswer]) -> Unavailable:
    """Not one message of a batch answered: the provider as a whole gave no answer (or asks every
    sender to slow down), which its shared retry loop, every worker's, waits out."""
    waits = [a.retry_after for a in answers if a.retry_after is not None]
    more = f" (and {len(answers) - 1} more)" if len(answers) > 1 else ""
    return Unavailable(answers[0].error + more, max(waits) if waits else None,
                       rate_limited=all(a.rate_limited for a in answers))


class Rejected(Exception):
    """The provider refused the request itself (a 4xx other than 429): every message in it fails."""


@dataclass(frozen=True)
class Provider:
    """The account a channel sends through: its rate (one Redis line, shared by the channels of one
    account) and its retry loop (one for all workers)."""

    name: str                    # the retry loop's name (`callflow:backoff:<name>`)
    rate_key: str                # the rate's Redis line
    rate_per_second: float
    retry_base_seconds: float
    retry_max_seconds: float
    probe_seconds: float         # how long one probe may take (the client's timeout, and some)
    margin: float = 0.0          # slack per message between a grant and the request's arrival
    spacing: bool = False        # one message per request: also keep the requests themselves spaced


class Channel:
    """The base of every channel; the loop asks nothing else of it."""

    name: str                    # the registry's key, and the task's argument
    queue: str                   # the Celery queue its tasks go on
    table: str                   # its outbox
    provider_id_column: str      # where a sent message's provider id is kept
    provider: Provider
    batch_size: int = 1          # messages per request
    expiry: timedelta | None = None   # pending this long: `failed` (the provider forgot the key)
    booking_horizon: float = 23 * 3600.0  # never book a send time further ahead
    stale_after: float = 10.0    # the sweep's: a pending row this old lost its task
    resend_every: int = 60       # the sweep re-sends a row at most once per this many seconds
    shares: bool = False         # each recipient books its share of the rate first (`share_of`)
    limited: bool = True         # False: no rate and no retry loop (the development outbox)
    sweep_every: float = 5.0     # beat sweeps its outbox this often

    @classmethod
    def from_settings(cls, settings) -> "Channel":
        """The channel with its provider's client, made from the settings."""
        raise NotImplementedError

    rows_sql: str                # the rows with what their messages need: `where <alias>.id = any(%s::uuid[])`
    rows_alias: str              # the outbox's alias in rows_sql (the rows locked)

    @classmethod
    def load(cls, conn, ids: Sequence[str], lock: bool = False) -> list[Record]:
        """The rows; `lock`: locked for this transaction, skipping those another holds."""
        sql = cls.rows_sql + (f" for update of {cls.rows_alias} skip locked" if lock else "")
        return [Record(r) for r in conn.execute(sql, (list(ids),)).fetchall()]

    def skip_reason(self, row: Record, now: datetime, at: datetime) -> str | None:
        """Why `row` gets no message if it went at `at` (now, or when it could go), or None."""
        return None

    def compose(self, row: Record, now: datetime) -> Any:
        raise NotImplementedError

    def send(self, messages: list[Any]) -> list[Result]:
        raise NotImplementedError

    def share_of(self, row: Record, now: datetime) -> tuple[str, float | None]:
        """Whose share of the rate the row takes, and within how many seconds it must go (None: no
        limit). Only asked when `shares`."""
        raise NotImplementedError

    def share_skip_reason(self, row: Record) -> str:
        return "its recipient's share of the rate was taken until it was of no use"

    def order(self, row: Record) -> Any:
        """Within one recipient's share, rows go in this order (the soonest useless first)."""
        return 0

    def forget(self, conn, gone: list[str]) -> None:
        """Addresses the provider says no longer exist (a channel with devices turns them off)."""

    def more_pending(self, conn, limit: int, exclude: list[str]) -> list[str]:
        """Other pending rows a first try tops its batch up with (channels with batches)."""
        return []

    def stale_pending(self, conn, older_than: float, limit: int) -> list[str]:
        """Pending rows older than `older_than` s, oldest first: the sweep's candidates."""
        age_limit = "and created_at >= now() - %(expiry)s" if self.expiry else ""
        return [str(r["id"]) for r in conn.execute(
            f"""select id from public.{self.table}
                 where status = 'pending' and created_at < now() - make_interval(secs => %(age)s) {age_limit}
                 order by created_at limit %(limit)s""",
            {"age": older_than, "limit": limit, "expiry": self.expiry}).fetchall()]

    def after_sweep(self, loop) -> dict:
        """More the sweep does for this channel (Expo's receipts, asked as its provider's retry loop
        `loop` lets); what it did, for the log."""
        return {}

    def describe_sent(self, row: Record, message: Any, result: Sent) -> dict:
        """Fields of the log line of a sent message."""
        return {}
