"""The `callflow` command line: a process entry point, so it lives with the processes (it parses
arguments and calls orchestration; `callflow tasks retry` sends through `workers.app`)."""

from __future__ import annotations

import json
import sys
import uuid

import click

from config.settings import ConfigurationError, Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigurationError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@click.group()
def main() -> None:
    """callflow: phone-call behaviour for LiveKit calls (invitations, ring timeouts, history, emails)."""


@main.command()
def migrate() -> None:
    """Apply pending supabase/migrations/*.sql to DATABASE_URL (idempotent)."""
    from orchestration.migrate import MigrationError, database_settings, migrate as run

    settings = _settings()
    try:
        result = run(settings.database_url, settings=database_settings(settings))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # connection problems: one clear line
        raise click.ClickException(f"cannot migrate: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if result.auth_shim:
        click.echo("created the local auth schema (plain Postgres)")
    for name in result.applied:
        click.echo(f"applied {name}")
    click.echo(f"database is up to date ({len(result.applied)} applied, {len(result.already)} already)")


@main.command()
def doctor() -> None:
    """Check configuration and every connection, one line each."""
    from orchestration.doctor import run_checks

    ok = True
    for name, passed, detail in run_checks():
        ok &= passed
        click.echo(f"{'OK  ' if passed else 'FAIL'} {name:<14} {detail}")
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--from", "caller", required=True, help="caller: an auth.users id or a local user's email")
@click.option("--to", "callee", required=True, help="callee: an auth.users id or a local user's email")
@click.option("--audio", is_flag=True, help="an audio call (default video)")
@click.option("--room", "room_name", default=None, help="room name (default: a new one)")
def call(caller: str, callee: str, audio: bool, room_name: str | None) -> None:
    """Insert an invitation as the product would (as the caller, under row level security)."""
    import psycopg

    from orchestration.db import connect
    from orchestration.dev_users import UnknownUser, resolve_user

    settings = _settings()
    room_name = room_name or f"call-{uuid.uuid4().hex[:12]}"
    try:
        with connect(settings.database_url) as conn:
            try:
                caller, callee = resolve_user(conn, caller), resolve_user(conn, callee)
            except UnknownUser as exc:
                raise click.ClickException(str(exc)) from None
            conn.execute("set local role authenticated")
            conn.execute(
                "select set_config('request.jwt.claims', %s, true)",
                (json.dumps({"sub": caller, "role": "authenticated"}),),
            )
            row = conn.execute(
                """insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                   values (%s, %s, %s, %s) returning id""",
                (room_name, caller, callee, "audio" if audio else "video"),
            ).fetchone()
    except psycopg.Error as exc:
        raise click.ClickException(f"refused: {exc.diag.message_primary or exc}") from None
    click.echo(f"invitation {row['id']} in room {room_name}")


@main.command()
@click.option("--limit", default=20, show_default=True)
def calls(limit: int) -> None:
    """Recent call history as a table."""
    from orchestration.db import connect

    settings = _settings()
    with connect(settings.database_url) as conn:
        rows = conn.execute(
            """select c.created_at, c.room_name, c.call_type, c.status, c.end_reason, c.duration_seconds,
                      coalesce(u.raw_user_meta_data->>'full_name', u.raw_user_meta_data->>'name', c.caller_id::text) as caller,
                      (select count(*) from public.call_invitations i where i.call_id = c.id) as invitations,
                      (select count(distinct p.identity) from public.call_participants p where p.call_id = c.id) as people
                 from public.calls c left join auth.users u on u.id = c.caller_id
                order by c.created_at desc limit %s""",
            (limit,),
        ).fetchall()
    headers = ["created (UTC)", "room", "type", "status", "reason", "secs", "caller", "inv", "people"]
    table = [
        [
            r["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
            r["room_name"],
            r["call_type"],
            r["status"],
            r["end_reason"] or "",
            str(r["duration_seconds"]),
            str(r["caller"])[:24],
            str(r["invitations"]),
            str(r["people"]),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if not table:
        click.echo("(no calls yet)")


@main.command("livekit-config")
@click.option("--webhook-url", default=None, help="where LiveKit posts webhooks (default: the local web)")
def livekit_config(webhook_url: str | None) -> None:
    """Print a LiveKit server config for local development (loopback, contract key pair)."""
    from orchestration.adapters.livekit_config import render_dev_config

    settings = _settings()
    if settings.is_production:
        raise click.ClickException("livekit-config is for local development only")
    click.echo(render_dev_config(settings, webhook_url or f"http://127.0.0.1:{settings.port}/livekit/webhook"), nl=False)


@main.command("dev-token")
@click.option("--user", "user_id", required=True, help="the auth.users id the token is for")
@click.option("--ttl", default=3600, show_default=True, help="lifetime in seconds")
def dev_token(user_id: str, ttl: int) -> None:
    """Print a user access token signed with the development SUPABASE_JWT_SECRET (local Supabase only)."""
    from orchestration.auth import dev_access_token

    settings = _settings()
    refusal = settings.development_defaults_refusal("dev-token")
    if refusal:
        raise click.ClickException(refusal)
    try:
        user_id = str(uuid.UUID(user_id))
    except ValueError:
        raise click.ClickException("--user must be a user id (a UUID)") from None
    email, metadata = None, {}
    try:  # Supabase puts the user's email and metadata in its tokens: do the same when we can.
        from orchestration.db import connect

        with connect(settings.database_url, connect_timeout=3) as conn:
            row = conn.execute("select email, raw_user_meta_data from auth.users where id = %s", (user_id,)).fetchone()
        if row is None:
            click.echo(f"warning: no auth.users row with id {user_id}", err=True)
        else:
            email, metadata = row["email"], row["raw_user_meta_data"] or {}
    except Exception as exc:  # noqa: BLE001 - the token needs no database
        click.echo(f"warning: cannot look the user up ({exc.__class__.__name__})", err=True)
    click.echo(dev_access_token(settings, user_id, email=email, user_metadata=metadata, ttl_seconds=ttl))


@main.command("dev-user")
@click.argument("name")
@click.option("--email", default=None, help="default: NAME@example.com (lower case, dots for spaces)")
@click.option("--timezone", "zone", default=None, help="IANA time zone for the user's emails, e.g. Europe/Paris")
def dev_user(name: str, email: str | None, zone: str | None) -> None:
    """Add a local user (auth.users) and print its id; an existing email prints that user's id."""
    from orchestration.db import connect
    from orchestration.dev_users import add_user

    settings = _settings()
    refusal = settings.development_defaults_refusal("dev-user")
    if refusal:
        raise click.ClickException(f"{refusal}; users come from Supabase Auth")
    try:
        with connect(settings.database_url, connect_timeout=5) as conn:
            user_id, created = add_user(conn, name, email, zone)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timezone") from None
    if not created:
        click.echo(f"a user with that email exists already: {user_id}", err=True)
    click.echo(user_id)


@main.group()
def tasks() -> None:
    """Tasks that ran out of retries (kept in callflow_failed_tasks)."""


@tasks.command("failed")
@click.option("--all", "include_retried", is_flag=True, help="include the ones already retried")
@click.option("--limit", default=50, show_default=True)
def tasks_failed(include_retried: bool, limit: int) -> None:
    """List failed tasks, newest first: id, task, attempts, when, error."""
    from orchestration.ops.failed_tasks import list_failed

    rows = list_failed(_settings().database_url, include_retried, limit)
    for r in rows:
        retried = f"  retried {r['retried_at']:%Y-%m-%d %H:%M:%S} as {r['retry_task_id']}" if r["retried_at"] else ""
        click.echo(f"{r['id']}  {r['failed_at']:%Y-%m-%d %H:%M:%S}  {r['task_name']}  attempts={r['attempts']}"
                   f"  args={json.dumps(r['args'])[:80]}{retried}")
        click.echo(f"    {r['error'].splitlines()[0][:200] if r['error'] else ''}")
    if not rows:
        click.echo("(no failed tasks)")


@tasks.command("retry")
@click.option("--id", "failed_id", default=None, help="only this one (its id or task id; default: every one not retried)")
def tasks_retry(failed_id: str | None) -> None:
    """Re-run failed tasks, each once, with their original arguments on their original queue."""
    from orchestration.ops.failed_tasks import RetryRefused, retry

    settings = _settings()
    from workers.app import app

    def send(name: str, args: list, kwargs: dict, queue: str | None) -> str:
        return app.send_task(name, args=args, kwargs=kwargs, queue=queue).id

    try:
        done = retry(settings.database_url, send, failed_id)
    except RetryRefused as exc:
        raise click.ClickException(str(exc)) from None
    for item in done:
        click.echo(f"retried {item.id} ({item.task_name}) as task {item.new_task_id}")
    if not done:
        click.echo("nothing to retry")


@main.group()
def notifications() -> None:
    """The missed-call email outbox."""


@notifications.command("retry")
@click.option("--id", "notification_id", default=None, help="only this notification (default: every failed one)")
def notifications_retry(notification_id: str | None) -> None:
    """Re-send failed emails that Resend never accepted (no provider message id), and only those."""
    from orchestration.notifications.retry import RetryRefused, retry_failed

    settings = _settings()
    try:
        result = retry_failed(settings, notification_id)
    except RetryRefused as exc:
        raise click.ClickException(str(exc)) from None
    for line in result.lines():
        click.echo(line)



@main.command()
@click.option("--month", default=None, metavar="YYYY-MM", help="the UTC month (default: this one)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object, for scripts")
def usage(month: str | None, as_json: bool) -> None:
    """LiveKit usage of a UTC month against CALLFLOW_LIVEKIT_PLAN: minutes, peak concurrency, bill."""
    from datetime import datetime, timezone

    from orchestration.db import connect
    from orchestration.usage import figures, store
    from orchestration.usage.plans import plan_named
    from orchestration.usage.report import month_usage

    settings = _settings()
    now = datetime.now(timezone.utc)
    try:
        chosen = figures.parse_month(month) if month else figures.month_of(now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    with connect(settings.database_url) as conn:
        result = month_usage(conn, plan_named(settings.callflow_livekit_plan), chosen, now)
        if chosen == figures.month_of(now):
            store.save_snapshot(conn, result)  # /metrics reads the freshest figures
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        for line in result.lines():
            click.echo(line)


if __name__ == "__main__":
    main()
