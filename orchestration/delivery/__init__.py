"""One delivery mechanism for every outbound channel (orchestration/channels): the channel's
interface (`channel`), the delivery loop (`loop`), the sweep of lost rows (`sweep`), the rate
(`rate`) and the outbox SQL they share (`outbox`). The Celery task pair is
workers/tasks/delivery.py: `callflow.deliver [channel, ids]` and the beat's
`callflow.sweep_outbox [channel]`."""
