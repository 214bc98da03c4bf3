"""callflow's domain and its service layer.

`domain` is pure; `lifecycle` holds the use cases (load a snapshot through a port, decide in a
pure function, apply in one transaction, run effects after commit); `adapters` talk to Postgres,
LiveKit, Celery and Resend.
"""
