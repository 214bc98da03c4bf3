"""Every name callflow's processes share on the wire: Celery task and queue names, Redis keys.

One place, arq-style, so a name is written once. Values are fixed: old and new deploys run side by
side on the same Redis and queues, so a value here never changes without a migration. Imports
nothing (every layer may import it). `tests/unit/test_names.py` fails on a `"callflow:` key or a
`"callflow.<task>"` name written anywhere else in orchestration/, workers/ or config/.
"""

from __future__ import annotations

# --- Celery queues (workers/queues.py keeps the order a worker takes them in) -------------------
Q_TIMERS = "timers"
Q_EVENTS = "events"
Q_SWEEPS = "sweeps"
Q_PUSH = "push"
Q_NOTIFICATIONS = "notifications"

# --- Celery task names ----------------------------------------------------------------------------
TASK_PREFIX = "callflow."  # every task's name starts with it (the lifecycle's step name drops it)
INVITATION_CHANGED = "callflow.invitation_changed"  # one change, handed on alone (sweeps, a failed batch)
INVITATIONS_CHANGED = "callflow.invitations_changed"  # the changes backlog's nudge (no args)
LIVEKIT_EVENT = "callflow.livekit_event"  # one webhook event, handed on alone (a failed batch)
LIVEKIT_EVENTS = "callflow.livekit_events"  # the webhook backlog's nudge (no args)
RING_TIMEOUT = "callflow.ring_timeout"  # one invitation's ring deadline
RING_TIMEOUTS_DUE = "callflow.ring_timeouts_due"  # a 50 ms bucket of ring deadlines (pre-built countdown)
GRACE_EXPIRED = "callflow.grace_expired"  # a participant's grace period after leaving
SWEEP = "callflow.sweep"  # beat: the lifecycle's sweep
CATCH_UP_INVITATIONS = "callflow.catch_up_invitations"  # beat: the listener's safety net
DELIVER = "callflow.deliver"  # [channel, ids]: a batch of one channel's outbox rows (emails, pushes, alerts)
SWEEP_OUTBOX = "callflow.sweep_outbox"  # beat [channel]: its outbox rows whose task was lost
PING = "callflow.ping"  # health: a worker answers by writing ping_key
CHECK_USAGE = "callflow.check_usage"  # beat: usage rollup and alerts
PRUNE = "callflow.prune"  # beat: retention, a bounded share of the rows older than CALLFLOW_RETENTION_DAYS

TASKS = (INVITATION_CHANGED, INVITATIONS_CHANGED, LIVEKIT_EVENT, LIVEKIT_EVENTS, RING_TIMEOUT,
         RING_TIMEOUTS_DUE, GRACE_EXPIRED, SWEEP, CATCH_UP_INVITATIONS, DELIVER, SWEEP_OUTBOX, PING,
         CHECK_USAGE, PRUNE)

# The outbound channels the lifecycle hands rows to (orchestration/channels), and their queues.
CHANNEL_EMAIL = "email"
CHANNEL_EXPO = "expo"
CHANNEL_USAGE_ALERT = "usage_alert"
CHANNEL_APNS_VOIP = "apns_voip"
CHANNEL_FCM = "fcm"
CHANNEL_QUEUES = {CHANNEL_EMAIL: Q_NOTIFICATIONS, CHANNEL_USAGE_ALERT: Q_NOTIFICATIONS, CHANNEL_EXPO: Q_PUSH,
                  CHANNEL_APNS_VOIP: Q_PUSH, CHANNEL_FCM: Q_PUSH}
# push_tokens.provider -> the channel that sends to it (the same names).
PUSH_CHANNELS = {"expo": CHANNEL_EXPO, "apns_voip": CHANNEL_APNS_VOIP, "fcm": CHANNEL_FCM}

# --- Redis keys -----------------------------------------------------------------------------------
# Ingest backlog of invitation changes: the listener/catch-up LPUSH changes, the worker takes them.
INGEST_CHANGES = "callflow:ingest:changes"
# Set NX by whoever lists a change while no nudge waits: one invitations_changed message at a time.
INGEST_NUDGED = "callflow:ingest:nudged"
# + task id: the changes a worker took, kept until done (a retry/redelivery takes them again).
INGEST_TAKEN_PREFIX = "callflow:ingest:taken:"
# Webhook backlog: `web` LPUSHes LiveKit events, the worker takes them.
WEBHOOK_EVENTS = "callflow:webhook:events"
# Set NX by whoever lists an event while no nudge waits: one livekit_events message at a time.
WEBHOOK_NUDGED = "callflow:webhook:nudged"
# + task id: the events a worker took, kept until done.
WEBHOOK_TAKEN_PREFIX = "callflow:webhook:taken:"
NUDGE_TTL_SECONDS = 2  # both backlogs' nudge marks
TAKEN_TTL_SECONDS = 3600  # both backlogs' taken lists

# + event id: `web`'s dedupe mark of a LiveKit webhook event (set NX before listing it).
WEBHOOK_SEEN_PREFIX = "callflow:webhook:seen:"
# LiveKit retries for ~15 s and drops events older than 30 s: an hour is well past that, and the
# database's unique `call_events.event_id` is the final guard.
WEBHOOK_SEEN_TTL_SECONDS = 3600


def ingest_seen_key(event_id: str) -> str:
    """Dedupe mark of one invitation transition (listener, catch-up, the worker's hand-on): set NX
    so a transition is listed once."""
    return f"callflow:ingest:seen:{event_id}"


INGEST_SEEN_TTL_SECONDS = 2 * 24 * 3600

# The catch-up's watermark: written by the listener's catch-up, the last change time it read.
INGEST_WATERMARK = "callflow:ingest:watermark"

# Sorted set of listener ids by last heartbeat (unix seconds): written by each listener.
LISTENERS_INDEX = "callflow:listeners"


def listener_key(listener_id: str) -> str:
    """A listener's heartbeat (its state as JSON), written by that listener every couple of seconds."""
    return f"callflow:listener:{listener_id}"


LISTENER_HEARTBEAT_TTL_SECONDS = 15


def timer_bucket_key(end_ms: int) -> str:
    """Set NX by the worker that pushes a ring-timeout bucket's countdown: one per 50 ms bucket."""
    return f"callflow:timer-bucket:{end_ms}"


TIMER_BUCKET_TTL_SECONDS = 24 * 3600
# How wide a bucket is: ring deadlines are grouped in buckets this wide, one countdown task per
# bucket ending every invitation due in it (so 10,000 ringing invitations are a few thousand
# timers, not 10,000). The scheduler adapter keys the buckets by it, the ring-timeout use case
# reads a bucket's invitations by it.
TIMER_BUCKET_SECONDS = 0.05

# + throttle key: the lifecycle's cross-worker `once(key, seconds)` marks (RedisThrottle; px=seconds).
SWEEP_THROTTLE_PREFIX = "callflow:sweep:"
# The sweep's lock: set by the beat sweep task while it runs, so two sweeps never overlap.
SWEEP_RUNNING = "callflow:sweep:running"


def ping_key(token: str) -> str:
    """Written by the `ping` task: proof a worker took a message (health checks read it)."""
    return f"callflow:ping:{token}"


PING_TTL_SECONDS = 300

# redbeat's key prefix: beat's schedule and lock (written by redbeat).
BEAT_PREFIX = "callflow:beat"

# Task outcomes counted by the workers' signals, read by /metrics.
OPS_TASK_OUTCOMES = "callflow:ops:task_outcomes"
# When /metrics first saw each queue's oldest message (its age).
OPS_OLDEST_SEEN = "callflow:ops:oldest_seen"
# Outbox rows delivered, by "<channel>:<status>", counted by the delivery loop, read by /metrics.
DELIVERY_OUTCOMES = "callflow:delivery:outcomes"


# Resend's rate (every email channel, shared by all workers).
RATELIMIT_RESEND = "callflow:ratelimit:resend"
# Expo's rate (the push channel, shared by all workers).
RATELIMIT_EXPO = "callflow:ratelimit:expo"
# APNs' and FCM's rates (the VoIP and Android push channels, shared by all workers).
RATELIMIT_APNS = "callflow:ratelimit:apns"
RATELIMIT_FCM = "callflow:ratelimit:fcm"
# Per-user rate limit's default prefix (+ ":" + user, see orchestration.rate_limit).
RATELIMIT_PREFIX = "callflow:ratelimit"
# The token route's per-user rate limit prefix.
RATELIMIT_TOKEN_PREFIX = "callflow:ratelimit:token"


def backoff_key(name: str) -> str:
    """A shared backoff (SharedBackoff): written by every worker that hit that service's refusal."""
    return f"callflow:backoff:{name}"


def delivery_waiting_key(channel: str, row_id: str) -> str:
    """Set while a task waits to come back for an outbox row: first tries and the sweep leave it alone.
    Deleted when the row's outcome is recorded."""
    return f"callflow:delivery:{channel}:waiting:{row_id}"


def delivery_resent_key(channel: str, row_id: str) -> str:
    """Set NX by the outbox sweep when it re-sends a row: at most one re-send per period."""
    return f"callflow:delivery:{channel}:resent:{row_id}"


# Prefix of a user's open SSE streams (sorted set `callflow:streams:<user id>`), held by `web`.
STREAMS_PREFIX = "callflow:streams"

# Retention (orchestration/retention), written by the prune task, read by /metrics. No expiry: lost,
# the counters start again from 0 and each table's walk from its start.
# Hash table -> rows pruned (a counter for /metrics).
RETENTION_PRUNED = "callflow:retention:pruned"
# Hash table -> Unix time of the oldest row kept, as of the last pass over it.
RETENTION_OLDEST = "callflow:retention:oldest"
# Hash of where each table's walk goes on: `<table>` -> next heap block or minute, and
# `<table>:pass_oldest` -> the oldest row kept so far in the pass under way.
RETENTION_CURSOR = "callflow:retention:cursor"
