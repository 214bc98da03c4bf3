"""Tasks that ran out of retries (or were refused as malformed), kept in `callflow_failed_tasks`
with their arguments, error and attempts, and re-run on demand (`callflow tasks retry`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from orchestration.db import connect

ERROR_LIMIT = 2000


def record(database_url: str, *, task_id: str, task_name: str, queue: str | None, args, kwargs, error: str,
           attempts: int) -> None:
    with connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            """insert into public.callflow_failed_tasks (task_id, task_name, queue, args, kwargs, error, attempts)
               values (%s, %s, %s, %s, %s, %s, %s)
               on conflict (task_id) do update
                 set error = excluded.error, attempts = excluded.attempts, failed_at = now()""",
            (task_id, task_name, queue, json.dumps(list(args or []), default=str),
             json.dumps(dict(kwargs or {}), default=str), error[:ERROR_LIMIT], attempts),
        )


def list_failed(database_url: str, include_retried: bool = False, limit: int = 50) -> list[dict]:
    with connect(database_url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(
            f"""select id, task_id, task_name, queue, args, kwargs, error, attempts, failed_at, retried_at, retry_task_id
                  from public.callflow_failed_tasks
                 {'' if include_retried else 'where retried_at is null'}
                 order by failed_at desc limit %s""",
            (limit,),
        ).fetchall()


@dataclass
class Retried:
    id: str
    task_name: str
    new_task_id: str


class RetryRefused(Exception):
    pass


def retry(database_url: str, send: Callable[[str, list, dict, str | None], str], failed_id: str | None = None) -> list[Retried]:
    """Re-sends each failed task not retried yet (or only `failed_id`), once: the row is locked and
    marked retried in the transaction that sends it, so two operators cannot both re-run it.
    `send(task_name, args, kwargs, queue)` publishes the task and returns its new id."""
    done: list[Retried] = []
    with connect(database_url, connect_timeout=5) as conn:
        if failed_id is not None:
            row = conn.execute("select retried_at from public.callflow_failed_tasks where id::text = %s or task_id = %s",
                               (failed_id, failed_id)).fetchone()
            if row is None:
                raise RetryRefused(f"no failed task {failed_id}")
            if row["retried_at"] is not None:
                raise RetryRefused(f"task {failed_id} was already retried at {row['retried_at']:%Y-%m-%d %H:%M:%S}")
        rows = conn.execute(
            """select id, task_name, queue, args, kwargs from public.callflow_failed_tasks
                where retried_at is null and (%s::text is null or id::text = %s or task_id = %s)
                order by failed_at for update skip locked""",
            (failed_id, failed_id, failed_id),
        ).fetchall()
        for row in rows:
            new_id = send(row["task_name"], row["args"], row["kwargs"], row["queue"])
            conn.execute("update public.callflow_failed_tasks set retried_at = now(), retry_task_id = %s where id = %s",
                         (new_id, row["id"]))
            done.append(Retried(str(row["id"]), row["task_name"], new_id))
        conn.commit()
    return done
