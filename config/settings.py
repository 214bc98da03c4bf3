"""Every variable of the contract, in one settings object.

`load_settings()` is what a process calls at start: a missing or malformed value stops it with one
line naming the variable (never its value: secrets are `SecretStr` and never printed).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_LIVEKIT_API_KEY = "devkey"
DEV_LIVEKIT_API_SECRET = "devsecret-devsecret-devsecret-0001"
# The Supabase CLI's published local secret: only ever a development default.
DEV_SUPABASE_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_EMAIL_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\".]+")


def is_loopback_address(address: str | None) -> bool:
    """An IP address of this machine's loopback (127.0.0.0/8, ::1, or IPv4-mapped 127.x): never a name."""
    try:
        ip = ipaddress.ip_address((address or "").strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def is_loopback_host(host: str | None) -> bool:
    """A URL's host that can only be this machine: `localhost` or a loopback address."""
    host = (host or "").strip().lower().rstrip(".")
    return host == "localhost" or is_loopback_address(host)


class ConfigurationError(Exception):
    """A setting is missing or malformed; the message names the variable, never its value."""


class Settings(BaseSettings):
    # An empty variable counts as unset (a blank `KEY=` line must not pass as a value).
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    callflow_env: Literal["development", "production"] = "development"
    database_url: str | None = None
    redis_url: str | None = None
    port: int = Field(default=8000, ge=1, le=65535)

    livekit_url: str | None = None
    livekit_public_url: str | None = None
    livekit_api_key: str | None = None
    livekit_api_secret: SecretStr | None = None
    livekit_webhook_keys: SecretStr | None = None

    supabase_url: str | None = None
    supabase_service_role_key: SecretStr | None = None
    supabase_jwt_secret: SecretStr | None = None
    callflow_listener_source: Literal["auto", "realtime", "postgres"] = "auto"

    resend_api_key: SecretStr | None = None
    resend_api_url: str | None = None
    callflow_email_from: str | None = None
    callflow_email_rate_per_second: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    callflow_outbox_dir: Path = Path(".local/outbox")
    callflow_app_url: str = "http://localhost:3000"

    callflow_ring_timeout_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    callflow_sweep_interval_seconds: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    callflow_grace_seconds: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    callflow_token_ttl_seconds: int = Field(default=600, gt=0)
    callflow_token_rate_per_minute: int = Field(default=30, gt=0)
    callflow_invite_rate_per_minute: int = Field(default=30, gt=0)
    callflow_email_repeat_window_seconds: float = Field(default=900.0, ge=0, allow_inf_nan=False)
    callflow_allow_anonymous: bool = False
    # GET /api/calls/events: open streams a user may hold (all web processes together) and one
    # web process may hold (its file descriptors and memory: ~40 KiB a stream).
    callflow_streams_per_user: int = Field(default=10, gt=0, le=1000)
    callflow_streams_per_process: int = Field(default=2000, gt=0, le=1_000_000)

    flower_basic_auth: SecretStr | None = None

    # Expo push (orchestration/push): unset in development means JSON files in the outbox folder.
    expo_access_token: SecretStr | None = None
    expo_push_url: str | None = None
    callflow_push_rate_per_second: float = Field(default=500.0, gt=0, le=600, allow_inf_nan=False)

    # Ringing like a phone (orchestration/channels/apns_voip.py, fcm.py): unset means no such pushes
    # (in development, JSON files in the outbox folder).
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_private_key: SecretStr | None = None  # the .p8 key's PEM text (ES256)
    apns_topic: str | None = None              # the iOS app's bundle id (VoIP topic: <topic>.voip)
    apns_url: str = "https://api.push.apple.com"
    fcm_project_id: str | None = None
    fcm_service_account_json: SecretStr | None = None  # the key's JSON text, or a path to it
    fcm_url: str = "https://fcm.googleapis.com"
    fcm_token_url: str | None = None  # wins over the key file's token_uri

    # LiveKit usage (orchestration/usage): the plan's names are those of orchestration.usage.plans.PLANS.
    callflow_livekit_plan: Literal["build", "ship", "scale", "self-hosted"] = "build"
    callflow_ops_email: str | None = None
    # Retention (orchestration/retention): at least a day, so a pruned call_events row is always
    # older than anything that deduplicates on it (LiveKit's retries, the Redis marks, the sweeps'
    # look-backs); at most 100 years.
    callflow_retention_days: int = Field(default=90, ge=1, le=36500)

    # Browser-facing: unset means the environment's default (see cors_origins, demo_enabled).
    callflow_cors_origins: str | None = None
    callflow_demo: bool | None = None
    supabase_anon_key: str | None = None  # public by design (the anon key), unlike the service key

    # ---- validation of shapes ----------------------------------------------------------------
    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, v):
        # A blank value (`KEY=` or `KEY="  "`) is no value: the default, or "required" in production.
        if isinstance(v, str) and not v.strip():
            raise PydanticUseDefault()
        return v

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis:// URL")
        return v

    @field_validator("livekit_url", "livekit_public_url")
    @classmethod
    def _livekit_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("ws", "wss", "http", "https"):
            raise ValueError("must be a ws(s):// or http(s):// URL")
        return v

    @field_validator("supabase_url", "resend_api_url", "callflow_app_url", "expo_push_url", "apns_url", "fcm_url",
                     "fcm_token_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http(s):// URL")
        return v.rstrip("/") if v else v

    @field_validator("livekit_webhook_keys")
    @classmethod
    def _key_pairs(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            for pair in filter(None, (p.strip() for p in v.get_secret_value().split(","))):
                key, sep, secret = pair.partition(":")
                if not sep or not key or not secret:
                    raise ValueError("must be comma-separated key:secret pairs")
        return v

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            for pair in v.get_secret_value().split(","):
                user, sep, password = pair.partition(":")
                if not sep or not user.strip() or not password:
                    raise ValueError("must be user:password")
        return v

    @field_validator("callflow_livekit_plan", mode="before")
    @classmethod
    def _plan_name(cls, v):
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("callflow_ops_email")
    @classmethod
    def _one_address(cls, v: str | None) -> str | None:
        if v is not None and not _EMAIL_ADDRESS.fullmatch(v.strip()):
            raise ValueError("must be one email address")
        return v.strip() if v else v

    @model_validator(mode="after")
    def _defaults_and_required(self) -> "Settings":
        prod = self.callflow_env == "production"
        required = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "LIVEKIT_URL": self.livekit_url,
            "LIVEKIT_API_KEY": self.livekit_api_key,
            "LIVEKIT_API_SECRET": self.livekit_api_secret,
            "RESEND_API_KEY": self.resend_api_key,
            "CALLFLOW_EMAIL_FROM": self.callflow_email_from,
        }
        if prod:
            for name, value in required.items():
                if isinstance(value, SecretStr):
                    value = value.get_secret_value()
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ConfigurationError(f"{name} is required in production")
            if self.supabase_url is None or self.supabase_service_role_key is None:
                if not (self.listener_source == "postgres" and self.supabase_jwt_secret):
                    missing = "SUPABASE_URL" if self.supabase_url is None else "SUPABASE_SERVICE_ROLE_KEY"
                    raise ConfigurationError(
                        f"{missing} is required in production (unless CALLFLOW_LISTENER_SOURCE=postgres "
                        "and SUPABASE_JWT_SECRET is set)"
                    )
        else:
            self.database_url = self.database_url or "postgresql://postgres:postgres@127.0.0.1:54322/postgres"
            self.redis_url = self.redis_url or "redis://127.0.0.1:6379/0"
            self.livekit_url = self.livekit_url or "ws://127.0.0.1:7880"
            self.livekit_api_key = self.livekit_api_key or DEV_LIVEKIT_API_KEY
            self.livekit_api_secret = self.livekit_api_secret or SecretStr(DEV_LIVEKIT_API_SECRET)
            if self.supabase_is_local:  # never with a real project, whatever CALLFLOW_ENV says
                self.supabase_jwt_secret = self.supabase_jwt_secret or SecretStr(DEV_SUPABASE_JWT_SECRET)
            self.callflow_email_from = self.callflow_email_from or "Callflow <calls@callflow.localhost>"
        if self.listener_source == "realtime" and (self.supabase_url is None or self.supabase_service_role_key is None):
            raise ConfigurationError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are required for the realtime listener")
        self.livekit_public_url = self.livekit_public_url or self.livekit_url
        apns = {"APNS_KEY_ID": self.apns_key_id, "APNS_TEAM_ID": self.apns_team_id,
                "APNS_PRIVATE_KEY": self.apns_private_key, "APNS_TOPIC": self.apns_topic}
        if any(v is not None for v in apns.values()) and any(v is None for v in apns.values()):
            missing = ", ".join(k for k, v in apns.items() if v is None)
            raise ConfigurationError(f"{missing} required with the other APNS_* variables (VoIP pushes)")
        if (self.fcm_project_id is None) != (self.fcm_service_account_json is None):
            missing = "FCM_PROJECT_ID" if self.fcm_project_id is None else "FCM_SERVICE_ACCOUNT_JSON"
            raise ConfigurationError(f"{missing} is required with the other FCM_* variable (FCM pushes)")
        return self

    def __repr_args__(self):
        # URLs may carry a password (postgresql://user:pw@host, redis://:pw@host): never show it.
        for name, value in super().__repr_args__():
            if name in ("database_url", "redis_url") and isinstance(value, str):
                value = _URL_PASSWORD.sub(r"\1**********@", value)
            yield name, value

    # ---- derived values ------------------------------------------------------------------------
    @property
    def is_production(self) -> bool:
        return self.callflow_env == "production"

    @property
    def supabase_is_local(self) -> bool:
        """SUPABASE_URL unset, or on this machine (the Supabase CLI's local stack): no real users."""
        return self.supabase_url is None or is_loopback_host(urlsplit(self.supabase_url).hostname)

    @property
    def development_defaults_allowed(self) -> bool:
        """The contract's one rule for what can sign in as anyone: the development JWT secret, the
        `/api/dev/*` routes and `callflow dev-token` / `dev-user`. Only in development and only
        while SUPABASE_URL is unset or loopback: forgetting CALLFLOW_ENV=production next to a real
        project's URL must not make the published Supabase CLI secret a key to its users."""
        return not self.is_production and self.supabase_is_local

    def development_defaults_refusal(self, what: str) -> str | None:
        """Why `what` (a development-only door) is refused here, in one line; None when it is allowed."""
        if self.is_production:
            return f"{what} is refused in production"
        if not self.supabase_is_local:
            return (f"{what} is refused: SUPABASE_URL is not a loopback address (development tokens and users "
                    "are for a local Supabase only)")
        return None

    @property
    def expo_push_configured(self) -> bool:
        """Pushes go to Expo (production, or a token or URL given); else to the outbox folder."""
        return self.is_production or self.expo_access_token is not None or self.expo_push_url is not None

    @property
    def apns_configured(self) -> bool:
        """VoIP pushes go to APNs (all four APNS_* set); else, in development, to the outbox folder."""
        return self.apns_key_id is not None

    @property
    def fcm_configured(self) -> bool:
        return self.fcm_project_id is not None

    @property
    def expo_push_base_url(self) -> str:
        return (self.expo_push_url or "https://exp.host").rstrip("/")

    @property
    def cors_origins(self) -> list[str]:
        """Origins allowed on `/api/`: development allows the local Next.js app; production none unless set."""
        if self.callflow_cors_origins is None:
            return [] if self.is_production else ["http://localhost:3000", "http://127.0.0.1:3000"]
        return [o.strip().rstrip("/") for o in self.callflow_cors_origins.split(",") if o.strip()]

    @property
    def demo_enabled(self) -> bool:
        return (not self.is_production) if self.callflow_demo is None else self.callflow_demo

    @property
    def listener_source(self) -> Literal["realtime", "postgres"]:
        if self.callflow_listener_source == "auto":
            return "realtime" if self.supabase_url else "postgres"
        return self.callflow_listener_source

    @property
    def livekit_http_url(self) -> str:
        """The Twirp API speaks HTTP on the same port as the WebSocket."""
        assert self.livekit_url
        return self.livekit_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)

    def webhook_keys(self) -> dict[str, str]:
        """Every key:secret accepted on webhooks: the main pair plus the rotation pairs."""
        keys: dict[str, str] = {}
        if self.livekit_api_key and self.livekit_api_secret:
            keys[self.livekit_api_key] = self.livekit_api_secret.get_secret_value()
        if self.livekit_webhook_keys:
            for pair in filter(None, (p.strip() for p in self.livekit_webhook_keys.get_secret_value().split(","))):
                key, _, secret = pair.partition(":")
                keys[key.strip()] = secret.strip()
        return keys

    def jwt_secret(self) -> str | None:
        return self.supabase_jwt_secret.get_secret_value() if self.supabase_jwt_secret else None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first.get("loc") or ()
    if loc:
        return f"{str(loc[0]).upper()} is malformed: {first['msg'].removeprefix('Value error, ')}"
    msg = str(first.get("ctx", {}).get("error") or first["msg"])
    return msg.removeprefix("Value error, ")


def build_settings(**overrides) -> Settings:
    """Settings from the environment (plus overrides); raises ConfigurationError with one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except ConfigurationError:
        raise


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return build_settings()


def load_settings_or_exit() -> Settings:
    """For process entrypoints: one line on stderr naming the variable, then exit 2."""
    try:
        return get_settings()
    except ConfigurationError as exc:
        print(f"callflow: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
