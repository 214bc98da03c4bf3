-- Push to the callee's phones: the devices a user registered, and the push outbox. A device's
-- token is an Expo push token, an APNs VoIP (PushKit) device token or an FCM registration token
-- (`provider`). What each provider's devices get (an apns_voip token: incoming_call only) is the
-- push outbox's rule (PostgresUnitOfWork.add_pushes), not the table's.

create table public.push_tokens (
  id            uuid primary key default public.callflow_uuid_v7(),
  user_id       uuid not null references auth.users (id) on delete cascade,
  token         text not null,
  platform      text not null,
  device_name   text,
  created_at    timestamptz not null default now(),
  last_seen_at  timestamptz not null default now(),
  disabled_at   timestamptz,
  provider      text not null default 'expo',  -- which channel sends to it (names.PUSH_CHANNELS)
  constraint push_tokens_platform_known check (platform in ('ios', 'android')),
  constraint push_tokens_provider_known check (provider in ('expo', 'apns_voip', 'fcm')),
  constraint push_tokens_token_shape check (
    (provider = 'expo' and token ~ '^Expo(nent)?PushToken\[[^\]]+\]$')
    or (provider = 'apns_voip' and token ~ '^[0-9a-f]{64}$')
    or (provider = 'fcm' and token ~ '^[^[:space:]]+$' and length(token) <= 4096)),
  constraint push_tokens_provider_token_unique unique (provider, token)  -- the same string under two providers: two devices
);
create index push_tokens_user_enabled on public.push_tokens (user_id) where disabled_at is null;

create table public.push_messages (
  id              uuid primary key default public.callflow_uuid_v7(),
  kind            text not null,
  invitation_id   uuid not null references public.call_invitations (id) on delete cascade,
  push_token_id   uuid not null references public.push_tokens (id) on delete cascade,
  status          text not null default 'pending',
  attempts        integer not null default 0,
  ticket_id       text,
  receipt_status  text,
  last_error      text,
  created_at      timestamptz not null default now(),
  sent_at         timestamptz,
  constraint push_messages_kind_known check (kind in ('incoming_call', 'call_ended', 'missed_call')),
  constraint push_messages_status_known check (status in ('pending', 'sent', 'failed', 'skipped')),
  constraint push_messages_receipt_known check (receipt_status is null or receipt_status in ('ok', 'error')),
  constraint push_messages_once unique (kind, invitation_id, push_token_id)
);
create index push_messages_pending on public.push_messages (created_at) where status = 'pending';
create index push_messages_unreceipted on public.push_messages (sent_at)
  where status = 'sent' and receipt_status is null and ticket_id is not null;
create index push_messages_token on public.push_messages (push_token_id);

-- A user sees, inserts and deletes only their own devices; the outbox is callflow's.
alter table public.push_tokens enable row level security;
alter table public.push_messages enable row level security;

create policy "users read their devices" on public.push_tokens
  for select to authenticated using (auth.uid() = user_id);
create policy "users add their devices" on public.push_tokens
  for insert to authenticated with check (auth.uid() = user_id and disabled_at is null);
create policy "users remove their devices" on public.push_tokens
  for delete to authenticated using (auth.uid() = user_id);

-- `select register_push_token(token, platform, device_name)` for Expo, or
-- `select register_push_token(token, platform, device_name, provider)`: the signed-in user's
-- device. A token registered to another user moves to the caller (an account switch on the
-- phone); registering again refreshes it and turns it back on (the cap of 10 enabled tokens is the
-- triggers' below). An APNs token is taken in either case (stored lower-case). A malformed token or
-- an unknown provider or platform is refused saying so.
create function public.register_push_token(token text, platform text, device_name text default null,
                                           provider text default 'expo')
returns public.push_tokens
language plpgsql security definer set search_path = public
as $$
declare
  uid uuid := auth.uid();
  kind text := register_push_token.provider;
  tok text := register_push_token.token;
  broken text;
  row public.push_tokens;
begin
  if uid is null then
    raise exception 'register_push_token: sign in first' using errcode = '42501';
  end if;
  if kind is null or kind not in ('expo', 'apns_voip', 'fcm') then
    raise exception 'register_push_token: unknown provider %', coalesce(quote_literal(kind), 'null')
      using errcode = '22023', hint = 'provider is expo (the default), apns_voip or fcm';
  end if;
  if kind = 'apns_voip' then
    tok := lower(tok);
  end if;
  begin
    insert into public.push_tokens as t (user_id, provider, token, platform, device_name)
    values (uid, kind, tok, register_push_token.platform, register_push_token.device_name)
    on conflict on constraint push_tokens_provider_token_unique do update
       set user_id = excluded.user_id, platform = excluded.platform,
           device_name = coalesce(excluded.device_name, t.device_name),
           last_seen_at = now(), disabled_at = null
    returning * into row;
  exception when check_violation then
    get stacked diagnostics broken = constraint_name;
    if broken = 'push_tokens_token_shape' then
      raise exception 'register_push_token: not a well-formed % token', kind
        using errcode = '23514', constraint = 'push_tokens_token_shape',
              hint = case kind
                       when 'expo' then 'an Expo push token: ExponentPushToken[...]'
                       when 'apns_voip' then 'a PushKit VoIP device token: 64 hexadecimal characters'
                       else 'an FCM registration token: no whitespace, at most 4096 characters'
                     end;
    elsif broken = 'push_tokens_platform_known' then
      raise exception 'register_push_token: unknown platform %',
                      coalesce(quote_literal(register_push_token.platform), 'null')
        using errcode = '23514', constraint = 'push_tokens_platform_known', hint = 'platform is ios or android';
    end if;
    raise;
  end;
  return row;
end
$$;

-- A user has at most 10 enabled push tokens (the contract): registering one more — a new token, a
-- turned-off one registered again, one moved here from another account, through
-- register_push_token or a client's own insert under RLS — turns off their least recently seen
-- (`last_seen_at`, then the oldest `created_at`). The one just registered always stays on.
--
-- Enforced by the table itself, so every way in is covered: AFTER triggers (an upsert's BEFORE
-- INSERT trigger fires even when the row ends up an update of an enabled token, which must turn
-- nothing off). Concurrency: the user's transaction-scoped advisory lock serialises the
-- registrations of one user, and the count is read after it is taken (each statement of a
-- plpgsql function sees what committed before it, at READ COMMITTED, as PostgREST runs), so two
-- registrations at once cannot both keep 10 others. Security definer: clients have no UPDATE on
-- push_tokens, and the trigger turns off rows of theirs that RLS would let them see anyway.
-- Issue 23: 50,000 tokens on one account made one invitation a million pushes.

create or replace function public.callflow_push_tokens_cap()
returns trigger
language plpgsql security definer set search_path = public
as $$
begin
  perform pg_advisory_xact_lock(hashtextextended('push_tokens:' || new.user_id::text, 23));
  -- One statement inserting many rows queues a trigger per row: a row an earlier one turned off
  -- is no longer one more.
  if not exists (select 1 from public.push_tokens t
                  where t.id = new.id and t.user_id = new.user_id and t.disabled_at is null) then
    return null;
  end if;
  update public.push_tokens
     set disabled_at = now()
   where id in (select t.id from public.push_tokens t
                 where t.user_id = new.user_id and t.disabled_at is null and t.id <> new.id
                 order by t.last_seen_at desc, t.created_at desc, t.id desc
                offset 9);  -- the 9 most recently seen others stay on, beside the new one
  return null;
end
$$;

create trigger push_tokens_cap_insert
  after insert on public.push_tokens
  for each row when (new.disabled_at is null)
  execute function public.callflow_push_tokens_cap();

-- Turned back on (register_push_token clears disabled_at) or moved to another user.
create trigger push_tokens_cap_update
  after update of disabled_at, user_id on public.push_tokens
  for each row when (new.disabled_at is null and (old.disabled_at is not null or old.user_id <> new.user_id))
  execute function public.callflow_push_tokens_cap();
