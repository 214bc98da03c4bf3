"""The local LiveKit server's configuration: the contract's key pair, loopback only."""

from __future__ import annotations

import json

from config.settings import Settings


def render_dev_config(settings: Settings, webhook_url: str, port: int = 7880, rtc_tcp_port: int = 7881,
                      rtc_udp_port: int = 7882) -> str:
    key = settings.livekit_api_key
    secret = settings.livekit_api_secret.get_secret_value()  # type: ignore[union-attr]
    # JSON is valid YAML; json.dumps quotes every string safely.
    q = json.dumps
    return "\n".join(
        [
            f"port: {port}",
            "bind_addresses:",
            "  - 127.0.0.1",
            "rtc:",
            f"  tcp_port: {rtc_tcp_port}",
            f"  udp_port: {rtc_udp_port}",
            "  use_external_ip: false",
            "  node_ip: 127.0.0.1",
            "keys:",
            f"  {q(key)}: {q(secret)}",
            "webhook:",
            f"  api_key: {q(key)}",
            "  urls:",
            f"    - {q(webhook_url)}",
            "logging:",
            "  level: warn",
            "",
        ]
    )
