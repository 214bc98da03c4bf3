"""`python -m bench`: the benchmarks, each its own one command."""

BENCHMARKS = {
    "webhook": "webhook ingest: verified webhooks/s and latency beside a bare endpoint and redis-benchmark",
    "listener": "insert-to-enqueue latency and inserts/s through the listener beside raw INSERT",
    "lifecycle": "lifecycles/s beside pgbench, CPU and transactions per lifecycle, latencies at 50/s, ring-timeout lateness",
    "timers": "ring-timeout lateness p50/p99/max and worker PSS, optionally with a worker SIGKILLed",
    "usage": "`callflow usage` on a month of 1,000,000 sessions beside the direct-SQL peak",
    "sse": "web RSS with 1,000 idle event streams; change-to-stream latency p50/p99",
    "push_flood": "ringing and incoming-call push p99 for other users while one account floods its own devices, vs quiet",
    "token": "POST /api/livekit/token and its authorisation query: latency p50/p99 and requests/s on a database with history",
}

if __name__ == "__main__":
    print("run one benchmark with:  .venv/bin/python -m bench.NAME   (figures: bench/RESULTS.md)\n")
    for name, what in BENCHMARKS.items():
        print(f"  bench.{name:<10} {what}")
