-- Ringing like a phone (issue 25): a device's token is an Expo push token, an APNs VoIP (PushKit)
-- device token or an FCM registration token. `push_tokens.provider` says which, and so which
-- channel sends to it (names.PUSH_CHANNELS); the token's shape is checked per provider, and a token
-- is unique per provider (the same string under two providers is two devices).
-- What each provider's devices get (an apns_voip token: incoming_call only) is the push outbox's
-- rule (PostgresUnitOfWork.add_pushes), not the table's.

alter table public.push_tokens
  add column provider text not null default 'expo';

alter table public.push_tokens
  drop constraint push_tokens_token_unique,
  drop constraint push_tokens_token_shape;

alter table public.push_tokens
  add constraint push_tokens_provider_known check (provider in ('expo', 'apns_voip', 'fcm')),
  add constraint push_tokens_token_shape check (
    (provider = 'expo' and token ~ '^Expo(nent)?PushToken\[[^\]]+\]$')
    or (provider = 'apns_voip' and token ~ '^[0-9a-f]{64}$')
    or (provider = 'fcm' and token ~ '^[^[:space:]]+$' and length(token) <= 4096)),
  add constraint push_tokens_provider_token_unique unique (provider, token);

-- `select register_push_token(token, platform, device_name)` for Expo, or
-- `select register_push_token(token, platform, device_name, provider)`: the signed-in user's
-- device. A token registered to another user moves to the caller (an account switch on the
-- phone); registering again refreshes it and turns it back on (the cap of 10 enabled tokens is the
-- table's triggers', 20261206000003). An APNs token is taken in either case (stored lower-case).
-- The old three-argument function goes: beside this one a three-argument call would be ambiguous.
drop function public.register_push_token(text, text, text);

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
revoke all on function public.register_push_token(text, text, text, text) from public, anon, authenticated;
grant execute on function public.register_push_token(text, text, text, text) to authenticated, service_role;
