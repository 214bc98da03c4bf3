"""The ports the handlers take: what they need from the world, named by what it means to them.

Typed in the domain's values only (`orchestration.domain`: a `Want` is loaded as a `Snapshot`, a
`Decision` applied), never in a use case's: a port leans on nothing the lifecycle or an adapter defines.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Iterable, Protocol

if TYPE_CHECKING:
    from orchestration.domain.decision import Decision, Snapshot, Want
    from orchestration.domain.model import Invitation


@dataclass(frozen=True)
class LiveParticipant:
    identity: str
    sid: str
    state: str  # JOINING, JOINED, ACTIVE, DISCONNECTED


@dataclass(frozen=True)
class RoomInfo:
    name: str
    sid: str


class RoomError(Exception):
    """LiveKit could not do what was asked (after the adapter's own retries)."""


class RoomUnanswered(RoomError):
    """LiveKit gave no answer: unreachable, a timeout, a 5xx or 429. Never an answer: ask again."""


class RoomRefused(RoomError):
    """LiveKit answered no (a 4xx other than 429): asking again will not change it."""


class Rooms(Protocol):
    """LiveKit's RoomService, as the lifecycle uses it. Every call is idempotent."""

    def create_room(self, name: str, *, empty_timeout: int, departure_timeout: int, max_participants: int,
                    metadata: str) -> RoomInfo: ...

    def list_participants(self, room: str) -> list[LiveParticipant] | None:
        """The room's live participants; [] when the room does not exist; None when LiveKit can't say."""

    def existing_rooms(self, names: list[str]) -> set[str] | None:
        """Which of these rooms exist now; None when LiveKit can't say."""

    def delete_room(self, room: str) -> None: ...

    def remove_participant(self, room: str, identity: str) -> None: ...


class Scheduler(Protocol):
    """Work that must happen later or elsewhere, handed to the task queue after commit."""

    def ring_timeouts(self, deadlines: "list[tuple[str, datetime]]") -> None:
        """Make sure each (invitation id, deadline) is looked at when its deadline comes."""

    def ring_timeout_bucket(self, end: float) -> None:
        """Look at every deadline of the bucket ending at `end` (unix seconds) then."""

    def ring_timeout_at(self, invitation_id: str, at: datetime) -> None:
        """Look at this one invitation's deadline at `at`."""

    def grace_expiry(self, room_name: str, participant_sid: str, identity: str, aborted: bool | None, delay: float) -> None: ...

    def deliver(self, channel: str, ids: list[str]) -> None:
        """Deliver these outbox rows of `channel` (orchestration/channels; batched, rate limited)."""

    def invitation_changed(self, change) -> None:
        """Hand this change (an `orchestration.ingest.mapping.Change`) on to a worker, alone, as
        `Change.to_wire()`: the one codec the tasks decode with."""


class UnitOfWork(Protocol):
    """One transaction of the store. `load` and `apply` are the lifecycle's; the rest are the
    small reads of first looks and sweeps."""

    def now(self) -> datetime: ...

    def load(self, want: "Want", *, lock: bool = True) -> "Snapshot":
        """The snapshot a decision needs; with `lock`, its invitation and call rows are locked."""

    def apply(self, decision: "Decision") -> list:
        """Write what the decision changed; returns the follow-up effects (emails to send)."""

    def event_seen(self, event_id: str) -> bool: ...

    def events_seen(self, event_ids: "Iterable[str]") -> set[str]: ...

    def invitation(self, invitation_id: str) -> "Invitation | None": ...

    def invitations(self, invitation_ids: "Iterable[str]") -> dict[str, "Invitation"]: ...

    def counter_invitations(self, pairs: "Iterable[tuple[str, str]]", *, lock: bool = False) -> list["Invitation"]:
        """Open invitations from callee to caller for each (caller, callee) (the other half of a glare)."""

    def live_call_ids(self, room_names: "Iterable[str]") -> dict[str, str]:
        """Each of these rooms' live call (ringing or active), for the rooms that have one."""

    def busy_users(self, user_rooms: "Iterable[tuple[str, str]]") -> set[str]:
        """Of these (user, room): the users in an active call other than that room's (the contract's busy)."""

    def is_party(self, room_name: str, identity: str) -> bool:
        """Whether `identity` is one of the room's parties now (the contract's definition)."""

    def set_room_sid(self, call_id: str, room_sid: str) -> None: ...

    # room actions: written down with the decision that calls for one, struck off once LiveKit answered
    def room_actions_done(self, keys: "list[str]") -> None: ...

    def room_actions_failed(self, failures: "list[tuple[str, float, str]]") -> None:
        """(key, seconds until its next attempt, error) each."""

    def take_due_room_actions(self, limit: int, lease: float) -> list[dict]:
        """Actions whose next attempt is due (key, action, room_name, call_id, identity,
        participant_sid, attempts), kept from other sweeps for `lease` seconds."""

    # sweeps
    def ringing_due_between(self, start: datetime, end: datetime, limit: int = 2000) -> list[dict]: ...

    def due_ring_timeouts(self, limit: int, overdue_by: float = 0.0) -> list[dict]: ...

    def stale_pending(self, older_than: float, limit: int) -> list[dict]: ...

    def unrecorded_transitions(self, older_than: float, within: float, limit: int,
                               since: datetime | None = None) -> list[dict]:
        """Client-made terminal invitations whose change was never taken (no event recorded),
        changed more than `older_than` seconds ago, less than `within` ago and not before `since`,
        oldest change first."""

    def due_grace_expiries(self, grace: float, limit: int) -> list[dict]: ...

    def silent_active_calls(self, ring_timeout: float, grace: float, limit: int) -> list[dict]:
        """Active calls nobody is connected to, answered longer than the ring timeout ago."""

    def live_calls_older_than(self, seconds: float, limit: int) -> list[dict]:
        """Live calls made more than `seconds` ago whose room is not still to be made."""

    def live_rooms(self, limit: int) -> list[str]:
        """The room names of live calls."""


class Store(Protocol):
    def transaction(self, *rooms: str, pairs: "Iterable[tuple[str, str]]" = ()) -> AbstractContextManager[UnitOfWork]:
        """One transaction; serialised with every other one on the same rooms (and pairs of users)."""


class Throttle(Protocol):
    def once(self, key: str, seconds: float) -> bool:
        """True the first time `key` is asked for within `seconds` (across all workers)."""

    def forget(self, key: str) -> None:
        """The next `once(key, ...)` is True again (work that found no answer is looked at again soon)."""

    def mark(self, key: str) -> float | None:
        """How far a walk shared by all workers has got (Unix time); None: not begun, or forgotten."""

    def move_mark(self, key: str, at: float, keep_seconds: float) -> None:
        """The walk has got to `at` (a mark never moves back); forgotten `keep_seconds` after."""
