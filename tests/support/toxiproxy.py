"""Toxiproxy (Shopify's fault-injecting TCP proxy) between callflow and a dependency, for the fault tests.

`scripts/stack.sh test` builds `toxiproxy-server` from its Go module (`CALLFLOW_TOXIPROXY_BIN`).
A test starts one server, makes a proxy per dependency (LiveKit's API, Postgres, Redis, a stand-in)
and points the process under test at the proxy's listen address. Faults go through Toxiproxy's
HTTP API, never through the client: `cut()` disables the proxy (every connection is closed and new
ones are refused), toxics degrade it (`latency`, `reset_peer`, `timeout`, ...).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import httpx

from devstack.services import ROOT, Process, free_port, wait_for


def toxiproxy_binary() -> str | None:
    for candidate in (os.environ.get("CALLFLOW_TOXIPROXY_BIN"), str(ROOT / ".local" / "bin" / "toxiproxy-server"),
                      shutil.which("toxiproxy-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class Proxy:
    """One proxy: `listen` is what the process under test connects to."""

    def __init__(self, server: "ToxiproxyServer", name: str, listen_port: int, upstream: str) -> None:
        self.server, self.name, self.listen_port, self.upstream = server, name, listen_port, upstream

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def _post(self, path: str, body: dict) -> dict:
        response = self.server.http.post(f"/proxies/{self.name}{path}", json=body)
        response.raise_for_status()
        return response.json() if response.content else {}

    def cut(self) -> None:
        """Every connection closed, new ones refused."""
        self._post("", {"enabled": False})

    def restore(self) -> None:
        self._post("", {"enabled": True})

    def add_toxic(self, kind: str, name: str | None = None, stream: str = "downstream", toxicity: float = 1.0,
                  **attributes) -> str:
        name = name or f"{kind}_{stream}"
        self._post("/toxics", {"name": name, "type": kind, "stream": stream, "toxicity": toxicity,
                               "attributes": attributes})
        return name

    def remove_toxic(self, name: str) -> None:
        self.server.http.delete(f"/proxies/{self.name}/toxics/{name}").raise_for_status()

    def clear(self) -> None:
        """Back to a clean pipe: enabled, no toxics."""
        self.restore()
        for toxic in self.server.http.get(f"/proxies/{self.name}/toxics").json():
            self.remove_toxic(toxic["name"])

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.cut()
        try:
            yield
        finally:
            self.restore()

    @contextlib.contextmanager
    def toxic(self, kind: str, **kwargs) -> Iterator[None]:
        name = self.add_toxic(kind, **kwargs)
        try:
            yield
        finally:
            self.remove_toxic(name)


class ToxiproxyServer:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.process: Process | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5)

    def start(self) -> "ToxiproxyServer":
        binary = toxiproxy_binary()
        if binary is None:
            raise RuntimeError("no toxiproxy-server binary: run `scripts/stack.sh test` (it builds one)")
        self.process = Process("toxiproxy", [binary, "-host", "127.0.0.1", "-port", str(self.port)],
                               dict(os.environ), self.log_dir).start()
        wait_for(lambda: self.http.get("/version").status_code == 200, timeout=20, what="toxiproxy-server")
        return self

    def proxy(self, name: str, upstream: str) -> Proxy:
        """A new proxy on a free loopback port in front of `upstream` (host:port)."""
        port = free_port()
        response = self.http.post("/proxies", json={"name": name, "listen": f"127.0.0.1:{port}",
                                                    "upstream": upstream, "enabled": True})
        response.raise_for_status()
        return Proxy(self, name, port, upstream)

    def stop(self) -> None:
        self.http.close()
        if self.process:
            self.process.stop()
