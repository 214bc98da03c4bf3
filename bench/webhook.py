"""Webhook ingest benchmark: `.venv/bin/python -m bench.webhook [--duration S] [--profile]`.

In one run, on loopback only, against a private `redis-server` started here:
  1. `bare`     uvicorn + Starlette, `POST` returning 200 and doing nothing (the stack's ceiling);
  2. `webhook`  the real `web` app (`workers.web.app:app`), every request a distinct event signed
                with the livekit-api SDK (pre-computed), so each one is verified, parsed,
                deduplicated and listed for the workers;
  3. both again at a fixed 1,000 req/s (latency at the issue's target rate);
  4. `redis-benchmark -t lpush` on the same Redis.
Both servers run exactly like the Procfile's `web` (one uvicorn process, `--no-access-log`).
Load: `wrk` (Debian's; `apt-get install wrk`), one thread so it leaves the server its core, with
a Lua script cycling through the pre-signed requests; the fixed rate is paced by the script with
LuaJIT's ffi clock (open loop per thread, millisecond steps). Every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from orchestration.ingest.backlog import WEBHOOK_EVENTS


async def _bare(_request) -> Response:
    return Response(b'{"status":"accepted"}', media_type="application/json")


# The ceiling: the same server stack, an endpoint that does nothing.
bare_app = Starlette(routes=[Route("/livekit/webhook", _bare, methods=["POST"])])

ROOT = Path(__file__).resolve().parents[1]
KEY, SECRET = "devkey", "devsecret-devsecret-devsecret-0001"

WRK_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local reqs = {}
local n = 0
local i = 0
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local interval = 0
local next_at = nil

function init(args)
  local path = os.getenv("BENCH_REQUESTS")
  for line in io.lines(path) do
    local tab = line:find("\t", 1, true)
    local auth = line:sub(1, tab - 1)
    local body = line:sub(tab + 1)
    n = n + 1
    reqs[n] = wrk.format("POST", "/livekit/webhook",
      {["Authorization"] = auth, ["Content-Type"] = "application/webhook+json", ["User-Agent"] = "LiveKit"}, body)
  end
  if rate > 0 then interval = 1000.0 / rate end
end

function request()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

function delay()
  if interval == 0 then return 0 end
  local t = now_ms()
  if next_at == nil then next_at = t end
  next_at = next_at + interval
  local d = next_at - t
  if d < 0 then return 0 end
  return math.floor(d)
end

done = function(summary, latency, requests)
  io.write(string.format("BENCH requests=%d duration_us=%d non2xx=%d errors=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


PIN: dict[str, list[str]] = {"server": [], "load": []}  # taskset prefixes, set in main()


def _start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    import redis

    port = _free_port()
    proc = subprocess.Popen(
        [*PIN["load"], "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait(lambda: redis.Redis(port=port).ping(), 10, "redis")
    return proc, port


def _start_uvicorn(app: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    import httpx

    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    proc = subprocess.Popen(
        [*PIN["server"], uvicorn, app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    _wait(lambda: httpx.post(f"http://127.0.0.1:{port}/livekit/webhook", content=b"{}", timeout=1).status_code > 0,
          20, app)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _signed_requests(path: Path, count: int, room: str) -> None:
    """`count` distinct participant_joined events for one room, each signed by the livekit-api SDK."""
    from livekit.api import AccessToken

    from orchestration.webhooks import body_sha256

    now = int(time.time())
    with open(path, "w") as out:
        for n in range(count):
            event = {
                "event": "participant_joined",
                "id": f"EV_bench_{uuid.uuid4().hex[:16]}",
                "createdAt": str(now),
                "room": {"sid": "RM_benchroom0001", "name": room, "emptyTimeout": 300, "departureTimeout": 20,
                         "creationTime": str(now), "creationTimeMs": str(now * 1000), "numParticipants": 2,
                         "enabledCodecs": [{"mime": "audio/opus"}, {"mime": "video/VP8"}]},
                "participant": {"sid": f"PA_bench{n:08d}", "identity": str(uuid.UUID(int=n)), "state": "ACTIVE",
                                "joinedAt": str(now), "joinedAtMs": str(now * 1000), "name": "Bench",
                                "version": 2, "permission": {"canSubscribe": True, "canPublish": True,
                                                             "canPublishData": True},
                                "isPublisher": False, "kind": "STANDARD"},
            }
            body = json.dumps(event, separators=(",", ":"))
            token = AccessToken(KEY, SECRET).with_sha256(body_sha256(body.encode())).to_jwt()
            out.write(f"{token}\t{body}\n")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (the server's own CPU, whatever else runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(url: str, requests_file: Path, script: Path, duration: float, connections: int,
         rate: int = 0, server_pid: int | None = None) -> dict[str, float]:
    cpu_before = _cpu_seconds(server_pid) if server_pid else 0.0
    env = {**os.environ, "BENCH_REQUESTS": str(requests_file), "BENCH_RATE": str(rate)}
    argv = [*PIN["load"], "wrk", "-t1", f"-c{connections}", f"-d{max(1, int(duration))}s", "--timeout", "5s", "-s", str(script),
            url]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60).stdout
    match = re.search(r"BENCH requests=(\d+) duration_us=(\d+) non2xx=(\d+) errors=(\d+) p50_us=(\d+) p99_us=(\d+)",
                      out)
    if not match:
        raise SystemExit(f"bench: wrk output not understood:\n{out}")
    requests, duration_us, non2xx, errors, p50, p99 = map(int, match.groups())
    cpu_us = (_cpu_seconds(server_pid) - cpu_before) * 1e6 / max(requests, 1) if server_pid else float("nan")
    return {"rps": requests / (duration_us / 1e6), "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "requests": requests, "non2xx": non2xx, "errors": errors, "cpu_us": cpu_us}


def _redis_benchmark(port: int, requests: int = 200_000, clients: int = 50) -> dict[str, float]:
    out = subprocess.run([*PIN["load"], "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "lpush", "-n", str(requests),
                          "-c", str(clients), "--csv"], capture_output=True, text=True, timeout=120).stdout
    rows = [line for line in out.splitlines() if line.startswith('"LPUSH"')]
    if not rows:
        raise SystemExit(f"bench: redis-benchmark output not understood:\n{out}")
    fields = [float(v.strip('"')) for v in rows[-1].split(",")[1:]]
    return {"rps": fields[0], "p50_ms": fields[3], "p99_ms": fields[5], "requests": requests, "non2xx": 0, "errors": 0,
            "cpu_us": float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for the max-rate runs")
    parser.add_argument("--rate", type=int, default=1000, help="the fixed rate of the latency runs (req/s)")
    parser.add_argument("--events", type=int, default=0, help="distinct signed events (default: enough)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/webhook max-rate rounds")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the server to one CPU and wrk + Redis to the other")
    parser.add_argument("--profile", metavar="SVG", help="py-spy record the webhook server during its max run")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: `wrk` is missing: apt-get install wrk", file=sys.stderr)
        return 2
    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        print("bench: redis-server / redis-benchmark are missing: apt-get install redis-server", file=sys.stderr)
        return 2

    if not args.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        last = (os.cpu_count() or 2) - 1
        PIN["server"] = ["taskset", "-c", str(last)]
        PIN["load"] = ["taskset", "-c", ",".join(str(c) for c in range(last))]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="callflow-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        redis_proc, redis_port = _start_redis(workdir)
        procs.append(redis_proc)
        import redis

        r = redis.Redis(port=redis_port)
        env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "CALLFLOW_ENV": "development",
               "LIVEKIT_API_KEY": KEY, "LIVEKIT_API_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
        env.pop("LIVEKIT_WEBHOOK_KEYS", None)
        bare_port, web_port = _free_port(), _free_port()
        procs.append(_start_uvicorn("bench.webhook:bare_app", bare_port, env, workdir / "bare.log"))
        web = _start_uvicorn("workers.web.app:app", web_port, env, workdir / "web.log")
        procs.append(web)

        count = args.events or int(max(20_000, args.duration * 15_000))
        requests_file = workdir / "requests.tsv"
        t0 = time.monotonic()
        _signed_requests(requests_file, count, room="bench-room")
        print(f"signed {count} distinct events in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        script = workdir / "requests.lua"
        script.write_text(WRK_SCRIPT)
        bare_url = f"http://127.0.0.1:{bare_port}/livekit/webhook"
        web_url = f"http://127.0.0.1:{web_port}/livekit/webhook"

        def reset() -> None:
            r.flushall()

        # Warm up both (imports, first connections, Lua script load), then measure.
        _wrk(bare_url, requests_file, script, 2, args.connections)
        _wrk(web_url, requests_file, script, 2, args.connections)
        reset()

        bare_pid = procs[1].pid
        results: list[tuple[str, dict[str, float]]] = []
        pairs: list[tuple[dict[str, float], dict[str, float]]] = []
        queued_ok = True
        # Max rate: bare and webhook alternate, so a machine busy with something else for a while
        # weighs on both; the ratio is taken per round, then its median.
        for round_no in range(1, args.rounds + 1):
            bare = _wrk(bare_url, requests_file, script, args.duration, args.connections, server_pid=bare_pid)
            profiler = None
            if args.profile and round_no == 1:
                py_spy = str(Path(sys.executable).parent / "py-spy")
                profiler = subprocess.Popen([py_spy, "record", "-o", args.profile, "-p", str(web.pid), "-d",
                                             str(int(args.duration)), "--nonblocking"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            hook = _wrk(web_url, requests_file, script, args.duration, args.connections, server_pid=web.pid)
            if profiler:
                profiler.wait(args.duration + 30)
            # Every distinct event acknowledged is listed once (in-flight ones at the end too).
            queued = r.llen(WEBHOOK_EVENTS.items)
            distinct = min(hook["requests"], count)
            queued_ok &= distinct <= queued <= distinct + args.connections
            reset()
            pairs.append((bare, hook))
            results.append((f"bare endpoint, max rate (round {round_no})", bare))
            results.append((f"verified webhook, max rate (round {round_no})", hook))
        results.append((f"bare endpoint, {args.rate} req/s",
                        _wrk(bare_url, requests_file, script, args.duration, 50, rate=args.rate, server_pid=bare_pid)))
        webhook_fixed = _wrk(web_url, requests_file, script, args.duration, 50, rate=args.rate, server_pid=web.pid)
        results.append((f"verified webhook, {args.rate} req/s", webhook_fixed))
        reset()
        results.append(("redis-benchmark LPUSH (50 clients)", _redis_benchmark(redis_port)))
        reset()

        print()
        print(f"{'run':46} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'requests':>9} "
              f"{'non-2xx':>7} {'errors':>6}")
        for name, res in results:
            print(f"{name:46} {res['rps']:>8.0f} {res['p50_ms']:>7.2f} {res['p99_ms']:>7.2f} {res['cpu_us']:>10.0f} "
                  f"{res['requests']:>9} {res['non2xx']:>7} {res['errors']:>6}")
        ratios = sorted(hook["rps"] / bare["rps"] for bare, hook in pairs)
        cpu_ratios = sorted(bare["cpu_us"] / hook["cpu_us"] for bare, hook in pairs)
        median = ratios[len(ratios) // 2]
        print()
        print(f"verified webhook / bare endpoint, req/s: median {median:.2f} of rounds "
              f"{', '.join(f'{x:.2f}' for x in ratios)} (target >= 0.50)")
        print(f"same by server CPU per request (bare / webhook): median {cpu_ratios[len(cpu_ratios) // 2]:.2f}")
        print(f"p99 at {args.rate} req/s: {webhook_fixed['p99_ms']:.2f} ms (target < 20 ms)")
        print(f"every acknowledged event on the webhook backlog once: {'yes' if queued_ok else 'NO'}")
        pinning = (f"server on CPU {PIN['server'][-1]}, wrk and Redis on CPU {PIN['load'][-1]}" if PIN["server"]
                   else "no CPU pinning")
        print(f"machine: {os.cpu_count()} CPUs, {pinning}, load average before the run {load_before}")
        return 0 if queued_ok and not any(res["non2xx"] or res["errors"] for _n, res in results) else 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
