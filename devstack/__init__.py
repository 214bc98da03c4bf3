"""What the tests and the benchmarks share: the services they start (`services`: Postgres, a private
Redis, LiveKit, callflow's own processes) and the stand-ins for hosted services (`standins`:
Supabase Realtime and Auth's JWKS, Resend, Expo push).

Development code, never shipped (pyproject.toml packages `workers`, `orchestration` and `config`
only), and below both `tests/` and `bench/`: it imports neither, and they import each other not
at all (tests/unit/test_layout.py).
"""
