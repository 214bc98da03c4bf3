"""Every outbound channel, registered once (`build`); each is a `Channel` (orchestration/delivery)
in a module of its own, over an outbox table of its own:

- `missed_call_email`: `notifications` rows, through Resend (or `.eml` files in development);
- `usage_alert_email`: `callflow_usage_alerts` rows to CALLFLOW_OPS_EMAIL, the same Resend account;
- `expo_push`: `push_messages` rows of Expo devices, through Expo (or JSON files in development);
- `apns_voip`: `push_messages` rows of PushKit devices, `incoming_call` only, as APNs VoIP pushes
  that ring CallKit (or JSON files in development);
- `fcm`: `push_messages` rows of FCM devices, data-only FCM HTTP v1 messages for an Android call
  screen (or JSON files in development).

A new channel: a migration (its outbox table, and the rule that writes its rows), one module here,
and its entry in `TYPES`. The delivery loop, the sweep, the rate and the task pair are everyone's.
"""

from __future__ import annotations

from config.settings import Settings
from orchestration.channels.apns_voip import ApnsVoipChannel
from orchestration.channels.expo_push import ExpoPushChannel
from orchestration.channels.fcm import FcmChannel
from orchestration.channels.missed_call_email import MissedCallEmailChannel
from orchestration.channels.usage_alert_email import UsageAlertEmailChannel
from orchestration.delivery.channel import Channel

# The registration: one entry a channel.
TYPES: tuple[type[Channel], ...] = (MissedCallEmailChannel, UsageAlertEmailChannel, ExpoPushChannel, ApnsVoipChannel,
                                    FcmChannel)


def build(settings: Settings) -> dict[str, Channel]:
    """Every channel, made from the settings (once per worker process)."""
    return {kind.name: kind.from_settings(settings) for kind in TYPES}
