"""What operators see and act on: queue depths and task outcomes read from Redis (the same figures
from every process), and tasks that ran out of retries, kept in `callflow_failed_tasks`."""
