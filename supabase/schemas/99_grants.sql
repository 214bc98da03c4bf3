-- Who may reach what: every grant of callflow's tables, sequences and functions, in one place.
-- The contract's rule (kept by tests/integration/test_grants.py, an allowlist):
--   * clients (anon, authenticated) reach only the product's tables, as below, under RLS;
--   * `callflow_…` tables, and every sequence of callflow's tables: nothing for PUBLIC, anon,
--     authenticated;
--   * callflow's functions: EXECUTE for nobody but the owner and service_role, except
--     authenticated: register_push_token (the contract's), and the four helpers the invitation
--     guard calls with the client's own rights (pure: they read nothing).
--     Trigger functions need no EXECUTE (it is checked when the trigger is made, not when it
--     fires); security definer helpers called from security definer triggers run as the owner.
-- Postgres lets PUBLIC execute every new function, and a Supabase project's default privileges
-- (of `postgres`, in schema public) grant every new table, sequence and function to anon,
-- authenticated and service_role: hence the revokes. The project's default privileges are left as
-- they are (they are the product's too). The workers connect as the owner (DATABASE_URL:
-- `postgres`), whose rights none of this touches.

-- ---- the product's tables ---------------------------------------------------------------------
revoke all on public.call_invitations, public.calls, public.call_participants,
              public.call_events, public.notifications, public.push_tokens, public.push_messages
  from public, anon, authenticated;
grant select, insert, update on public.call_invitations to authenticated;
grant select on public.calls, public.call_participants to authenticated;
grant select, insert, delete on public.push_tokens to authenticated;
grant all on public.call_invitations, public.calls, public.call_participants,
             public.call_events, public.notifications, public.push_tokens, public.push_messages
  to service_role;

-- ---- callflow's internal tables ---------------------------------------------------------------
revoke all on public.callflow_settings, public.callflow_failed_tasks,
              public.callflow_usage_dirty, public.callflow_usage_sessions, public.callflow_usage_deltas,
              public.callflow_usage_minutes, public.callflow_usage_month_minutes, public.callflow_usage_months,
              public.callflow_usage_month_levels, public.callflow_usage_day_peaks, public.callflow_usage_call_hours,
              public.callflow_usage_call_marks, public.callflow_usage_alerts, public.callflow_room_actions, public.callflow_call_parties
  from public, anon, authenticated;
-- (The others get service_role's grant from a Supabase project's default privileges only; the
-- workers use none of them as service_role.)
grant all on public.callflow_room_actions, public.callflow_call_parties to service_role;

-- ---- sequences (identity columns) -------------------------------------------------------------
revoke all on sequence public.call_events_id_seq, public.callflow_usage_dirty_id_seq
  from public, anon, authenticated;

-- ---- functions ----------------------------------------------------------------------------------
revoke all on function
    public.callflow_is_terminal(text), public.callflow_default_end_reason(text),
    public.callflow_transition_allowed(text, text), public.callflow_is_client(),
    public.call_invitations_guard_insert(), public.call_invitations_guard_update(),
    public.call_invitations_status_by(), public.call_invitations_notify(), public.calls_notify(),
    public.callflow_setting(text, text),
    public.callflow_room_parties(text, uuid), public.call_invitations_admit(),
    public.register_push_token(text, text, text, text), public.callflow_push_tokens_cap(),
    public.callflow_usage_mark_participants(), public.callflow_usage_mark_calls(),
    public.callflow_usage_forget_all(), public.callflow_usage_refresh(integer),
    public.callflow_usage_minutes(timestamptz, timestamptz, timestamptz),
    public.callflow_usage_peak(timestamptz, timestamptz),
    public.callflow_usage_level_at(timestamptz), public.callflow_usage_levels_follow(),
    public.callflow_usage_day_peak(timestamptz), public.callflow_usage_calls(timestamptz, timestamptz),
    public.callflow_usage_mark_call_counts(), public.callflow_usage_forget_call_counts(),
    public.callflow_usage_fold_call_marks(integer),
    public.callflow_call_parties_add(), public.callflow_call_parties_forget(),
    public.callflow_call_parties_backfill(), public.callflow_uuid_v7()
  from public, anon, authenticated;

grant execute on function
    public.callflow_is_terminal(text), public.callflow_default_end_reason(text),
    public.callflow_transition_allowed(text, text), public.callflow_is_client(),
    public.call_invitations_guard_insert(), public.call_invitations_guard_update(),
    public.call_invitations_status_by(), public.call_invitations_notify(), public.calls_notify(),
    public.callflow_setting(text, text),
    public.callflow_room_parties(text, uuid), public.call_invitations_admit(),
    public.register_push_token(text, text, text, text),
    public.callflow_usage_mark_participants(), public.callflow_usage_mark_calls(),
    public.callflow_usage_forget_all(), public.callflow_usage_refresh(integer),
    public.callflow_usage_minutes(timestamptz, timestamptz, timestamptz),
    public.callflow_usage_peak(timestamptz, timestamptz), public.callflow_usage_level_at(timestamptz),
    public.callflow_usage_day_peak(timestamptz), public.callflow_usage_calls(timestamptz, timestamptz),
    public.callflow_usage_fold_call_marks(integer),
    public.callflow_call_parties_backfill(), public.callflow_uuid_v7()
  to service_role;
-- (callflow_push_tokens_cap, callflow_call_parties_add and _forget, callflow_usage_mark_call_counts
-- and callflow_usage_forget_call_counts are trigger functions: their
-- migrations gave service_role nothing, a Supabase project's default privileges do.)

-- The client's function, the helpers the invitation guard runs as the client, and the default of
-- an invitation's id (a default runs with the inserting role's rights).
grant execute on function
    public.register_push_token(text, text, text, text),
    public.callflow_is_client(), public.callflow_is_terminal(text),
    public.callflow_transition_allowed(text, text), public.callflow_default_end_reason(text),
    public.callflow_uuid_v7()
  to authenticated;
