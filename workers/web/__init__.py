"""The `web` process: LiveKit webhook consumer, token endpoint, health and metrics."""
