-- Tasks that ran out of retries (or were refused as malformed), kept for `callflow tasks failed`
-- and re-run by `callflow tasks retry`. Internal state: clients get no grants (99_grants.sql).
create table public.callflow_failed_tasks (
  id          uuid primary key default public.callflow_uuid_v7(),
  task_id     text not null,
  task_name   text not null,
  queue       text,
  args        jsonb not null default '[]'::jsonb,
  kwargs      jsonb not null default '{}'::jsonb,
  error       text not null,
  attempts    integer not null default 1,
  failed_at   timestamptz not null default now(),
  retried_at  timestamptz,
  retry_task_id text
);
-- A task redelivered after a crash can fail twice under one task id: one row per task id.
create unique index callflow_failed_tasks_task_id on public.callflow_failed_tasks (task_id);
create index callflow_failed_tasks_open on public.callflow_failed_tasks (failed_at desc)
  where retried_at is null;
alter table public.callflow_failed_tasks enable row level security;
