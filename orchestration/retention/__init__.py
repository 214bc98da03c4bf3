"""Retention (CALLFLOW_RETENTION_DAYS): old events, finished outbox rows and folded usage deltas
pruned in small batches (`prune`), and what /metrics shows of it (`metrics`)."""

from orchestration.retention.walks import MIN_DAYS, TABLES, Budget, Pruned, horizon, prune

__all__ = ["MIN_DAYS", "TABLES", "Budget", "Pruned", "horizon", "prune"]
