"""The `listener` process (`python -m workers.listener`): invitation changes to lifecycle tasks.

Source by `CALLFLOW_LISTENER_SOURCE`: Supabase Realtime (`realtime_source`) or Postgres LISTEN
(`postgres_source`); both feed `orchestration.ingest` (one mapping, Redis dedupe, catch-up) through
the supervisor in `core`.
"""
