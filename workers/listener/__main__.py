"""`python -m workers.listener [options]`: runs until SIGTERM/SIGINT; exits 2 on a configuration
error (one line on stderr naming the variable), 0 otherwise. The options tune supervision
(defaults are the production values); configuration comes from the environment (config/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from config.logging import configure_logging, register_secret
from config.settings import ConfigurationError, load_settings_or_exit


def _parser() -> argparse.ArgumentParser:
    from workers.listener.core import Options

    d = Options()
    p = argparse.ArgumentParser(prog="python -m workers.listener", description=__doc__)
    p.add_argument("--catch-up-interval", type=float, default=d.catch_up_interval,
                   help="seconds between catch-ups inside the listener (0: only on every (re)subscribe)")
    p.add_argument("--overlap", type=float, default=d.overlap_seconds, help="catch-up overlap before the watermark (s)")
    p.add_argument("--initial-horizon", type=float, default=d.initial_horizon_seconds,
                   help="how far back the first catch-up reads when Redis has no watermark (s)")
    p.add_argument("--backoff-base", type=float, default=d.backoff_base)
    p.add_argument("--backoff-max", type=float, default=d.backoff_max)
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    p.add_argument("--ping-interval", type=float, default=d.ping_interval)
    p.add_argument("--ping-timeout", type=float, default=d.ping_timeout)
    p.add_argument("--system-timeout", type=float, default=d.system_timeout)
    p.add_argument("--token-ttl", type=float, default=d.token_ttl, help="lifetime of minted Realtime tokens (s)")
    p.add_argument("--id", default=None, help="listener id in the heartbeat (default host-pid-random)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings.is_production)
    for secret in (settings.supabase_service_role_key, settings.supabase_jwt_secret, settings.livekit_api_secret,
                   settings.resend_api_key):
        if secret is not None:
            register_secret(secret.get_secret_value())

    import redis
    import structlog

    from orchestration.ingest.sink import IngestSink
    from workers.listener.core import Listener, Options

    log = structlog.get_logger("callflow.listener")
    options = Options(catch_up_interval=args.catch_up_interval, overlap_seconds=args.overlap,
                      initial_horizon_seconds=args.initial_horizon, backoff_base=args.backoff_base,
                      backoff_max=args.backoff_max, heartbeat_interval=args.heartbeat_interval,
                      ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
                      system_timeout=args.system_timeout, token_ttl=args.token_ttl)
    try:
        if settings.listener_source == "realtime":
            from workers.listener.realtime_source import RealtimeSource
            from workers.listener.tokens import TokenProvider

            if not settings.supabase_url or not settings.supabase_service_role_key:
                raise ConfigurationError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are required for the realtime listener")
            tokens = TokenProvider(settings.supabase_service_role_key.get_secret_value(), settings.jwt_secret(),
                                   ttl_seconds=options.token_ttl)
            if tokens.key_expires_soon:
                log.warning("SUPABASE_SERVICE_ROLE_KEY expires within a day and cannot be refreshed here")
            source = RealtimeSource(settings.supabase_url, tokens)
        else:
            from workers.listener.postgres_source import PostgresSource

            source = PostgresSource(settings.database_url)
    except ConfigurationError as exc:
        print(f"callflow: configuration error: {exc}", file=sys.stderr)
        return 2

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10,
                                  socket_connect_timeout=5, health_check_interval=15)
    listener = Listener(source, IngestSink(client), settings.database_url, options, args.id)
    log.info("listener starting", source=source.name, listener=listener.id)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, listener.stop)
        await listener.run()

    asyncio.run(run())
    log.info("listener stopped", listener=listener.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
