"""Local users for development: `callflow dev-user` adds one, `callflow call` takes one's email.

Locally `auth.users` is the minimal table of `supabase/local/auth_shim.sql`; on a Supabase project
users come from Supabase Auth (the command is refused in production).
"""

from __future__ import annotations

import json
import re
import uuid
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class UnknownUser(Exception):
    pass


def default_email(name: str) -> str:
    local = re.sub(r"[^a-z0-9]+", ".", name.strip().lower()).strip(".") or "user"
    return f"{local}@example.com"


def check_timezone(zone: str) -> str:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {zone!r} (an IANA name such as Europe/Paris)") from None
    return zone


def add_user(conn, name: str, email: str | None = None, timezone: str | None = None) -> tuple[str, bool]:
    """(user id, created). A user with that email already there is returned as it is, so seeding
    twice is harmless."""
    email = (email or default_email(name)).strip().lower()
    row = conn.execute("select id from auth.users where lower(email) = %s order by id limit 1", (email,)).fetchone()
    if row is not None:
        return str(row["id"]), False
    meta = {"full_name": name}
    if timezone:
        meta["timezone"] = check_timezone(timezone)
    row = conn.execute("insert into auth.users (email, raw_user_meta_data) values (%s, %s) returning id",
                       (email, json.dumps(meta))).fetchone()
    return str(row["id"]), True


def resolve_user(conn, ref: str) -> str:
    """A user id as given (a UUID), or the id of the local user with that email."""
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        pass
    if "@" not in ref:
        raise UnknownUser(f"{ref!r} is neither a user id nor an email")
    rows = conn.execute("select id from auth.users where lower(email) = lower(%s) limit 2", (ref.strip(),)).fetchall()
    if not rows:
        raise UnknownUser(f"no user with email {ref} (add one: callflow dev-user NAME --email {ref})")
    if len(rows) > 1:
        raise UnknownUser(f"more than one user has email {ref}: give the id")
    return str(rows[0]["id"])
