"""callflow's domain (the invitation state machine, commands, events) and its service layer.

`domain` is pure; `handlers` decide with ports passed in; `adapters` talk to Postgres, LiveKit,
Celery and Resend.
"""
