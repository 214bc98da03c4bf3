"""Celery task messages built without `send_task`, and their `task-sent` events: pure, no I/O.

The message: Celery protocol 2 (`celery.app.amqp.AMQP.as_task_v2`), wrapped the way kombu's Redis
transport writes it onto the queue's list (`kombu.transport.virtual.Channel.prepare_message` +
`_inplace_augment_message`, body base64-encoded), so a stock `celery worker` consumes it. Beside
it, the `task-sent` event `send_task` would publish for it (`PreBuiltTask`), for Flower.

Used by whoever pushes such messages from Lua: the webhook backlog (`web`,
`orchestration.adapters.redis_enqueue`), the ingest backlogs' nudges (`orchestration.ingest`) and
the ring-timeout countdowns (`orchestration.adapters.celery_scheduler`). `orchestration.webhooks`
re-exports these names for its older importers.
"""

from __future__ import annotations

import binascii
import itertools
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

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

