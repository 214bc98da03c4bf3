"""The `callflow` command line against the run's real services."""

from __future__ import annotations

import re
import subprocess

from devstack import services
from tests.conftest import subprocess_env
from tests.support.calls import enqueue_change, wait_call

CALLFLOW = str(services.VENV_BIN / "callflow")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([CALLFLOW, *args], env=subprocess_env(**env), capture_output=True, text=True, timeout=60)


def test_call_inserts_an_invitation_and_calls_shows_its_history(db, make_user, worker):
    caller, callee = make_user("Ana Souza"), make_user("Bo")
    out = cli("call", "--from", caller, "--to", callee, "--audio")
    assert out.returncode == 0, out.stderr
    invitation_id, room = re.match(r"invitation (\S+) in room (\S+)", out.stdout).groups()
    row = db.execute("select * from public.call_invitations where id = %s", (invitation_id,)).fetchone()
    assert (str(row["caller_id"]), str(row["callee_id"]), row["call_type"]) == (caller, callee, "audio")
    # Inserted `pending`; the session's beat, once an earlier test has started it, lists new
    # invitations every 5 s (its catch-up), so it may have been rung already.
    assert row["status"] in ("pending", "ringing")
    enqueue_change(invitation_id, "pending", room)
    wait_call(db, invitation_id, "ringing")
    table = cli("calls", "--limit", "50")
    assert table.returncode == 0, table.stderr
    header, rule, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["created", "(UTC)", "room"]
    mine = [line for line in lines if room in line]
    assert mine and "audio" in mine[0] and "ringing" in mine[0] and "Ana Souza" in mine[0]


def test_call_refused_by_the_database_says_why(make_user):
    user = make_user()
    out = cli("call", "--from", user, "--to", user)
    assert out.returncode != 0
    assert "call_invitations_caller_is_not_callee" in out.stderr
    unknown = cli("call", "--from", user, "--to", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode != 0 and "foreign key" in unknown.stderr


def test_doctor_prints_one_line_per_dependency(livekit):
    out = cli("doctor")
    names = [line.split()[1] for line in out.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert names[:6] == ["configuration", "postgres", "redis", "livekit", "supabase", "resend"]
    for line in out.stdout.splitlines()[:6]:
        assert line.startswith("OK"), line
    assert "devsecret" not in out.stdout + out.stderr


def test_a_bad_setting_stops_the_cli_with_one_line():
    out = cli("calls", REDIS_URL="http://nope")
    assert out.returncode != 0
    assert "REDIS_URL" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_dev_commands_refuse_a_real_supabase_url(db, make_user):
    """`dev-token` would sign with the published development secret and `dev-user` would add users
    behind a real project's back: with a non-loopback SUPABASE_URL both refuse in one line, whatever
    CALLFLOW_ENV says."""
    user = make_user()
    email = f"mallory-{user[:8]}@example.com"
    for callflow_env in (None, "development"):
        env = subprocess_env(SUPABASE_URL="https://abc.supabase.co", SUPABASE_SERVICE_ROLE_KEY="srk-not-used-" + "k" * 20)
        env.pop("SUPABASE_JWT_SECRET", None)
        env.pop("CALLFLOW_ENV", None)
        if callflow_env:
            env["CALLFLOW_ENV"] = callflow_env
        for args in (("dev-token", "--user", user), ("dev-user", "Mallory", "--email", email)):
            out = subprocess.run([CALLFLOW, *args], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode != 0, (args, out.stdout)
            assert out.stdout == "" and "eyJ" not in out.stderr, args
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "SUPABASE_URL" in lines[0], (args, out.stderr)
    assert db.execute("select count(*) n from auth.users where email = %s", (email,)).fetchone()["n"] == 0
    # A loopback SUPABASE_URL (the Supabase CLI's) is local development: allowed.
    out = cli("dev-token", "--user", user, SUPABASE_URL="http://127.0.0.1:54321", SUPABASE_SERVICE_ROLE_KEY="srk")
    assert out.returncode == 0 and out.stdout.startswith("eyJ"), out.stderr
