"""Adapters at the edge: Postgres, LiveKit, Celery, Resend."""
