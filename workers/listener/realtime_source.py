"""Supabase Realtime source: the `realtime` async client (2.34.x), `postgres_changes` on
`public.call_invitations` (INSERT and UPDATE), joined with the service role key.

Each session is a fresh `AsyncRealtimeClient` with its own reconnect turned off: the client gives
up for good after 5 failed reconnects and treats `phx_close` as final, so the listener's
supervisor owns reconnection instead. The session counts as live only when the server's
`system` message ("Subscribed to PostgreSQL", extension `postgres_changes`, status ok) arrives
(the client reports SUBSCRIBED earlier than changes flow); then the catch-up runs. The session
ends on a channel error or close, a join timeout, a missing `system` message, an unanswered
websocket ping (the client ignores heartbeat replies, so a silent server would otherwise go
unnoticed for ~40 s), or a dropped socket.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from orchestration.ingest.mapping import from_realtime
from workers.listener.core import Listener, SessionEnded
from workers.listener.tokens import TokenProvider

CHANNEL_NAME = "callflow-invitations"


class _FrameFilter(logging.Filter):
    """The client logs frames it cannot parse and skips them; count and report them our way."""

    def __init__(self) -> None:
        super().__init__()
        self.listener: Listener | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Unrecognized message format") and self.listener is not None:
            sample = message.removeprefix("Unrecognized message format ").split("\n", 1)[0]
            self.listener.malformed("frame", "not a Phoenix/Realtime frame the client accepts", sample)
            return False
        # The client logs every reconnect failure at error level; the supervisor reports them once.
        if message.startswith(("Connection attempt failed", "Connection failed permanently",
                               "WebSocket connection closed with code",
                               "Auto-reconnect disabled")):
            return False
        return True


_filter = _FrameFilter()
logging.getLogger("realtime._async.client").addFilter(_filter)


class RealtimeSource:
    name = "realtime"

    def __init__(self, supabase_url: str, tokens: TokenProvider) -> None:
        self.url = f"{supabase_url.rstrip('/')}/realtime/v1"
        self.tokens = tokens

    async def session(self, listener: Listener) -> None:
        _filter.listener = listener
        opts = listener.options
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = loop.create_future()

        def end(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        # `apikey` in the URL is the key itself; the channel joins with the (possibly minted) access token.
        client = AsyncRealtimeClient(self.url, token=self.tokens.key, auto_reconnect=False, max_retries=1,
                                     timeout=int(max(1, opts.system_timeout)))
        channel = None
        try:
            await client.set_auth(self.tokens.current())
            await asyncio.wait_for(client.connect(), timeout=opts.system_timeout)
            channel = client.channel(CHANNEL_NAME)

            def on_change(payload: Any) -> None:
                listener.accept_or_skip("postgres_changes", from_realtime, payload)

            def on_system(payload: Any) -> None:
                if payload.extension == "postgres_changes" and payload.status == "ok":
                    listener.mark_live()

            def on_subscribe(status: RealtimeSubscribeStates, error: Exception | None) -> None:
                if status == RealtimeSubscribeStates.SUBSCRIBED:
                    if listener.state["state"] != "live":
                        listener.mark_subscribing()
                elif status == RealtimeSubscribeStates.CLOSED:
                    end("channel closed by the server")
                elif status == RealtimeSubscribeStates.TIMED_OUT:
                    end("join timed out")
                else:
                    end(f"channel error: {str(error)[:200] if error else 'unknown'}")

            channel.on_postgres_changes("INSERT", on_change, table="call_invitations", schema="public")
            channel.on_postgres_changes("UPDATE", on_change, table="call_invitations", schema="public")
            channel.on_system(on_system)
            await channel.subscribe(on_subscribe)
            watch = loop.create_task(self._watch(client, listener, end))
            try:
                stop = loop.create_task(listener.stopping.wait())
                await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
            finally:
                watch.cancel()
            if ended.done():
                raise SessionEnded(ended.result())
        finally:
            if channel is not None:
                channel.rejoin_timer.reset()
            try:
                await asyncio.wait_for(client.close(), timeout=5)
            except Exception:  # noqa: BLE001 - the socket may already be gone
                pass

    async def _watch(self, client: AsyncRealtimeClient, listener: Listener, end) -> None:
        """Live within `system_timeout`, websocket pings answered, access token refreshed."""
        opts = listener.options
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_ping = started + opts.ping_interval
        refresh_in = self.tokens.refresh_in()
        next_refresh = started + refresh_in if refresh_in is not None else None
        while True:
            await asyncio.sleep(0.2)
            now = loop.time()
            if listener.state["state"] != "live" and now - started > opts.system_timeout:
                end("no 'Subscribed to PostgreSQL' from the server in time")
                return
            ws = client._ws_connection  # read-only use of the client's socket, for pings
            if ws is None:
                end("socket closed")
                return
            if now >= next_ping:
                try:
                    pong = await ws.ping()
                    await asyncio.wait_for(pong, timeout=opts.ping_timeout)
                except Exception:  # noqa: BLE001
                    end("server did not answer a websocket ping")
                    return
                next_ping = loop.time() + opts.ping_interval
            if next_refresh is not None and now >= next_refresh:
                await client.set_auth(self.tokens.current())
                refresh_in = self.tokens.refresh_in()
                next_refresh = loop.time() + (refresh_in if refresh_in is not None else 3600)
