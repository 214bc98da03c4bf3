"""Lifecycle tasks (being built)."""

from workers.app import app


@app.task(name="callflow.ping")
def ping(token: str) -> str:
    """Proves a queue is consumed: marks `token` in Redis."""
    import redis

    from workers.app import settings

    redis.Redis.from_url(settings.redis_url).set(f"callflow:ping:{token}", "1", ex=300)
    return token
