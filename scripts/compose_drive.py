"""Drives real calls through callflow's containers (scripts/compose-check.sh runs it from the host).

Users and their access tokens come from `callflow dev-user` / `dev-token` run inside the `web`
container; invitations go through `POST /api/calls`; both participants join the LiveKit container
with tokens from the containerised `POST /api/livekit/token` route (`livekit.rtc`); LiveKit's
container delivers its webhooks to `web`. The database (its published port) is only read, to see
the outcome. `calls`: one call is answered and hung up (`completed`), one rings out (`missed`)
and its email must land in the worker's outbox volume. `ring` leaves one ringing before the stack
is stopped, `missed` sees it end missed, with its email, once the stack is up again. Prints each
step's time; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psycopg
from livekit import rtc
from psycopg.rows import dict_row



def say(step: str, started: float) -> None:
    # stderr: stdout carries only what a phase returns (the id `ring` prints).
    print(f"  {step:<66} {time.monotonic() - started:5.1f} s", file=sys.stderr, flush=True)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.web = args.web.rstrip("/")
        self.compose = shlex.split(args.compose)
        self.db = psycopg.connect(args.database_url, autocommit=True, row_factory=dict_row)

    def exec_in(self, service: str, script: str) -> str:
        out = subprocess.run([*self.compose, "exec", "-T", service, "sh", "-c", script],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"exec in {service} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def http(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.web + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def row(self, sql: str, *params):
        return self.db.execute(sql, params).fetchone()

    def invitation(self, inv_id: str) -> dict:
        return self.row("select * from public.call_invitations where id = %s", inv_id)

    def call_of(self, inv_id: str) -> dict | None:
        return self.row("select c.* from public.calls c join public.call_invitations i on i.call_id = c.id"
                        " where i.id = %s", inv_id)


async def eventually(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_users(check: Check, names: list[str]) -> dict[str, tuple[str, str]]:
    """{name: (user id, access token)}, made inside the web container."""
    script = "set -e\n" + "".join(
        f'id=$(callflow dev-user {n} --email {n}@example.com 2>/dev/null)\n'
        f'echo "{n} $id $(callflow dev-token --user $id --ttl 3600)"\n' for n in names)
    users = {}
    for line in check.exec_in("web", script).splitlines():
        name, uid, token = line.split()
        users[name] = (uid, token)
    if set(users) != set(names):
        raise RuntimeError(f"users not made: {sorted(set(names) - set(users))}")
    return users


def start_call(check: Check, caller_token: str, callee_id: str) -> dict:
    status, body = check.http("POST", "/api/calls", caller_token, {"callee_ids": [callee_id], "call_type": "audio"})
    if status != 201:
        raise RuntimeError(f"POST /api/calls answered {status}: {body}")
    return body["invitations"][0]


def join_token(check: Check, user_token: str, inv_id: str) -> dict:
    status, body = check.http("POST", "/api/livekit/token", user_token, {"invitation_id": inv_id})
    if status != 200:
        raise RuntimeError(f"POST /api/livekit/token answered {status}: {body}")
    return body


class Participant:
    def __init__(self, grant: dict) -> None:
        self.grant = grant
        self.room = rtc.Room()
        self.disconnected = asyncio.Event()
        self.room.on("disconnected", lambda *_: self.disconnected.set())

    async def join(self) -> "Participant":
        await asyncio.wait_for(self.room.connect(self.grant["server_url"], self.grant["token"]), 20)
        return self

    async def leave(self) -> None:
        await self.room.disconnect()


def status_is(check: Check, inv_id: str, *statuses: str):
    return lambda: (lambda r: r if r["status"] in statuses else None)(check.invitation(inv_id))


def call_status_is(check: Check, inv_id: str, *statuses: str):
    return lambda: (lambda r: r if r and r["status"] in statuses else None)(check.call_of(inv_id))


def demo_served(check: Check) -> None:
    """The Node stage's bundle is in the image: /demo and its script answer 200."""
    for path in ("/demo", "/demo/demo.js"):
        with urllib.request.urlopen(check.web + path, timeout=15) as resp:
            body = resp.read()
            if resp.status != 200 or len(body) < 200:
                raise RuntimeError(f"GET {path} answered {resp.status} with {len(body)} bytes")


async def scenario(check: Check, ring_timeout: float) -> None:
    t = time.monotonic()
    demo_served(check)
    say("the demo page and its bundle (the Node stage) served by web", t)

    t = time.monotonic()
    users = make_users(check, ["alice", "bob", "carol", "dave"])
    say("users and access tokens (callflow dev-user/dev-token in web)", t)

    # The call that rings out starts first and runs its course while the answered call happens.
    t = time.monotonic()
    missed = start_call(check, users["dave"][1], users["carol"][0])
    answered = start_call(check, users["alice"][1], users["bob"][0])
    await eventually(status_is(check, missed["id"], "ringing"), 30, "dave -> carol ringing")
    await eventually(status_is(check, answered["id"], "ringing"), 30, "alice -> bob ringing")
    say("two invitations inserted (POST /api/calls) and ringing", t)

    t = time.monotonic()
    grants = [join_token(check, users[n][1], answered["id"]) for n in ("alice", "bob")]
    alice = await Participant(grants[0]).join()
    bob = await Participant(grants[1]).join()  # answering = joining
    await eventually(status_is(check, answered["id"], "accepted"), 20, "answered by joining")
    await eventually(call_status_is(check, answered["id"], "active"), 20, "call active")
    say(f"both joined {grants[0]['server_url']} with route tokens; call active", t)

    t = time.monotonic()
    room = answered["room_name"]
    await eventually(lambda: check.row("select count(*) as n from public.call_events where source = 'livekit'"
                                       " and type = 'participant_joined' and room_name = %s", room)["n"] >= 2,
                     20, "LiveKit's participant_joined webhooks recorded")
    say("LiveKit's webhooks delivered to web (participant_joined x2)", t)

    t = time.monotonic()
    await asyncio.sleep(2)
    await bob.leave()
    await eventually(lambda: alice.disconnected.is_set(), 30, "alice released after the grace period")
    call = await eventually(call_status_is(check, answered["id"], "completed"), 20, "call completed")
    if call["end_reason"] != "hangup" or not call["duration_seconds"] or call["duration_seconds"] < 1:
        raise RuntimeError(f"completed call looks wrong: {call}")
    say(f"bob hung up; call completed ({call['duration_seconds']} s, {call['end_reason']})", t)

    t = time.monotonic()
    await eventually(status_is(check, missed["id"], "missed"), ring_timeout + 30, "dave -> carol missed")
    await eventually(call_status_is(check, missed["id"], "missed"), 20, "missed call ended")
    note = await eventually(lambda: check.row("select * from public.notifications where invitation_id = %s"
                                              " and status = 'sent'", missed["id"]), 30, "missed-call email sent")
    if note["recipient_email"] != "carol@example.com":
        raise RuntimeError(f"email to the wrong recipient: {note['recipient_email']}")
    files = await eventually(lambda: check.exec_in(
        "worker", "grep -l 'carol@example.com' /app/.local/outbox/*.eml 2>/dev/null || true").split(), 20,
        "the email's .eml file in the outbox volume")
    say(f"dave -> carol missed; email in the outbox volume ({files[0].rsplit('/', 1)[-1]})", t)
    await alice.leave()


async def ring(check: Check) -> None:
    """An invitation left ringing (its ring-timeout countdown held by the worker): prints its id."""
    t = time.monotonic()
    users = make_users(check, ["erin", "frank"])
    inv = start_call(check, users["erin"][1], users["frank"][0])
    await eventually(status_is(check, inv["id"], "ringing"), 30, "erin -> frank ringing")
    say("erin -> frank ringing, left to ring out", t)
    print(inv["id"])


async def missed_after_restart(check: Check, inv_id: str, ring_timeout: float) -> None:
    t = time.monotonic()
    await eventually(status_is(check, inv_id, "missed"), ring_timeout + 60, "erin -> frank missed")
    await eventually(lambda: check.row("select 1 from public.notifications where invitation_id = %s"
                                       " and status = 'sent'", inv_id), 30, "its missed-call email sent")
    await eventually(lambda: check.exec_in(
        "worker", "grep -l 'frank@example.com' /app/.local/outbox/*.eml 2>/dev/null || true").split(), 20,
        "the email's .eml file in the outbox volume")
    say("erin -> frank missed across the restart; email in the outbox volume", t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["calls", "ring", "missed"],
                        help="calls: an answered and a missed call; ring: leave one ringing (prints its id);"
                             " missed: that one (--invitation) ends missed with its email")
    parser.add_argument("--web", required=True, help="web's published URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--database-url", required=True, help="Postgres through its published port (read only)")
    parser.add_argument("--compose", required=True, help="the compose command, e.g. 'docker compose -p callflow'")
    parser.add_argument("--ring-timeout", type=float, default=30)
    parser.add_argument("--invitation", help="the invitation of `ring`, for `missed`")
    args = parser.parse_args()
    check = Check(args)
    try:
        if args.phase == "calls":
            asyncio.run(scenario(check, args.ring_timeout))
        elif args.phase == "ring":
            asyncio.run(ring(check))
        else:
            asyncio.run(missed_after_restart(check, args.invitation, args.ring_timeout))
    except Exception as exc:  # noqa: BLE001 - one line for the operator, the script prints the logs
        print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        check.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
