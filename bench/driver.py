"""The benchmarks' client side: what an app does to the database (as a signed-in user, under RLS)
and when it sees its invitation `ringing` (a LISTEN on `callflow_invitations`, as the Realtime
stand-in reads it).

`watching(invitation_id, loop)` is called before the insert's commit (the worker may ring it at
once): a benchmark registers there the futures of whatever else it times (a push's arrival).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool


class ClientDriver:
    clock: Callable[[], float] = time.perf_counter  # the clock the stand-in's arrivals are read on

    def __init__(self, database_url: str, min_size: int = 4, max_size: int = 16) -> None:
        self.database_url = database_url
        self.min_size, self.max_size = min_size, max_size
        self.ringing: dict[str, asyncio.Future] = {}

    def watching(self, invitation_id: str, loop: asyncio.AbstractEventLoop) -> None:
        """Before an insert's commit: register the futures of what else is timed."""

    async def __aenter__(self):
        self.listen = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await self.listen.execute("listen callflow_invitations")
        self.reader = asyncio.create_task(self._read())
        self.pool = AsyncConnectionPool(self.database_url, min_size=self.min_size, max_size=self.max_size,
                                        open=False)
        await self.pool.open()
        await self.pool.wait()
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.listen.close()
        await self.pool.close()

    async def _read(self) -> None:
        async for note in self.listen.notifies():
            data = json.loads(note.payload)
            fut = self.ringing.get(data["id"])
            if data["status"] == "ringing" and fut is not None and not fut.done():
                fut.set_result(self.clock())

    async def as_client(self, user: str, sql: str, params: tuple, watch: bool = False):
        async with self.pool.connection() as c:
            async with c.transaction():
                await c.execute("set local role authenticated")
                await c.execute("select set_config('request.jwt.claims', %s, true)",
                                (json.dumps({"sub": user, "role": "authenticated"}),))
                row = await (await c.execute(sql, params)).fetchone()
                if watch:  # before the commit: the worker may ring it at once
                    loop = asyncio.get_running_loop()
                    self.ringing[str(row[0])] = loop.create_future()
                    self.watching(str(row[0]), loop)
        return row
