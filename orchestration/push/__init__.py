"""Push to the callee's phones through Expo's push service.

The lifecycle writes `push_messages` rows (one per enabled device, in the transaction of the
transition that calls for them); the Expo push channel (`orchestration/channels/expo_push.py`, on
the one delivery loop of `orchestration/delivery`) sends them in batches of up to 100, records
Expo's tickets, and later its receipts; `expo` is the HTTP client (or, in
development without Expo settings, JSON files under `$CALLFLOW_OUTBOX_DIR/push/`); `messages`
builds what a device receives.
"""
