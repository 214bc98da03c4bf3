"""Supabase Auth access tokens: verification (the token endpoint) and development tokens (the CLI).

Supabase signs user access tokens either with an asymmetric key published at
`{SUPABASE_URL}/auth/v1/.well-known/jwks.json` (ES256, or RS256) or, on projects not yet migrated,
with the legacy HS256 secret (`SUPABASE_JWT_SECRET`). Both are accepted, each only with its own
kind of key:

- the algorithm comes from the token header but is only ever checked against a key of that
  algorithm's family (HS256 -> the secret; ES256 -> an EC P-256 JWK; RS256 -> an RSA JWK), so
  `alg: none` and HS/RS key confusion have nothing to verify against;
- JWKS keys are cached (`max_age`), refetched at once when a token names an unknown `kid`; one
  fetch at a time, shared by every request waiting for it, and at most one per
  `min_refetch_interval` however many unknown kids arrive;
- claims: `exp` (required), `iat` not in the future, `aud` = `authenticated`, `role` =
  `authenticated`, `sub` a UUID, and `iss` = `{SUPABASE_URL}/auth/v1` when `SUPABASE_URL` is set.

Failures raise `InvalidToken` (-> 401) or `AuthUnavailable` (-> 503: no keys could be fetched).
Their messages are fixed texts: they never contain the token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from jwt.exceptions import PyJWTError

from config.logging import get_logger

log = get_logger(__name__)

AUDIENCE = "authenticated"
USER_ROLE = "authenticated"
ASYMMETRIC_ALGORITHMS = {"ES256": "EC", "RS256": "RSA"}
MAX_TOKEN_LENGTH = 16 * 1024


class InvalidToken(Exception):
    """The access token is not one we accept (-> 401). `str()` is a fixed, token-free text."""


class AuthUnavailable(Exception):
    """The signing keys could not be fetched (-> 503)."""


@dataclass(frozen=True)
class User:
    id: str
    role: str
    email: str | None = None
    phone: str | None = None
    is_anonymous: bool = False
    session_id: str | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def display_name(self) -> str | None:
        for key in ("full_name", "name"):
            value = self.user_metadata.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None


def issuer_for(supabase_url: str) -> str:
    return f"{supabase_url.rstrip('/')}/auth/v1"


def jwks_url_for(supabase_url: str) -> str:
    return f"{issuer_for(supabase_url)}/.well-known/jwks.json"


class JWKSCache:
    """The project's public keys by `kid`, fetched lazily, refetched on an unknown kid."""

    def __init__(self, url: str, *, max_age: float = 600.0, min_refetch_interval: float = 1.0,
                 timeout: float = 5.0, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self.max_age = max_age
        self.min_refetch_interval = min_refetch_interval
        self.timeout = timeout
        self._client = client
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._attempted_at: float = float("-inf")  # of the last attempt, successful or not
        self._generation = 0  # bumped by every fetch attempt
        self._lock: asyncio.Lock | None = None
        self.fetches = 0

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def get(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        known = self._keys.get(kid)
        if known is not None:
            fresh = self._fetched_at is not None and now - self._fetched_at <= self.max_age
            # Stale but known: serve it while one refresh is under way or the last try was recent.
            if fresh or self._get_lock().locked() or now - self._attempted_at < self.min_refetch_interval:
                return known
        generation = self._generation
        async with self._get_lock():
            # Someone else fetched while this request waited: use theirs, fetch no more.
            if self._generation == generation:
                wait = self._attempted_at + self.min_refetch_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._refresh()
        key = self._keys.get(kid)
        if key is None and self._fetched_at is None:
            raise AuthUnavailable("the signing keys could not be fetched")
        return key

    async def _refresh(self) -> None:
        self._attempted_at = time.monotonic()
        self._generation += 1
        self.fetches += 1
        try:
            client = self._client or httpx.AsyncClient(timeout=self.timeout)
            try:
                response = await client.get(self.url, headers={"Accept": "application/json"})
            finally:
                if self._client is None:
                    await client.aclose()
            response.raise_for_status()
            document = response.json()
            raw_keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(raw_keys, list):
                raise ValueError("no keys array")
        except (httpx.HTTPError, ValueError) as exc:
            # Keep serving the keys we have (if any): a JWKS hiccup must not log everyone out.
            log.warning("jwks fetch failed", url=self.url, error=exc.__class__.__name__)
            return
        keys: dict[str, jwt.PyJWK] = {}
        for raw in raw_keys:
            if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str):
                continue
            if raw.get("use", "sig") != "sig" or raw.get("kty") not in ("EC", "RSA") or "d" in raw:
                continue
            try:
                keys[raw["kid"]] = jwt.PyJWK(raw)
            except PyJWTError:
                log.warning("jwks key skipped", kid=raw.get("kid"))
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("jwks fetched", url=self.url, keys=len(keys))


class SupabaseTokenVerifier:
    """Verifies Supabase user access tokens; `await verify(token)` -> `User`."""

    def __init__(self, *, supabase_url: str | None, jwt_secret: str | None, leeway: float = 10.0,
                 jwks: JWKSCache | None = None, jwks_url: str | None = None) -> None:
        self.issuer = issuer_for(supabase_url) if supabase_url else None
        self.jwt_secret = jwt_secret or None
        self.leeway = leeway
        url = jwks_url or (jwks_url_for(supabase_url) if supabase_url else None)
        self.jwks = jwks or (JWKSCache(url) if url else None)

    @classmethod
    def from_settings(cls, settings) -> "SupabaseTokenVerifier":
        return cls(supabase_url=settings.supabase_url, jwt_secret=settings.jwt_secret())

    async def verify(self, token: str) -> User:
        if not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise InvalidToken("the access token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise InvalidToken("the access token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str):  # the sender's JSON: a list or an object is no name (nor hashable)
            raise InvalidToken("the access token's algorithm is not accepted")
        if alg == "HS256":
            if not self.jwt_secret:
                raise InvalidToken("HS256 access tokens are not accepted here")
            key: Any = self.jwt_secret
        elif alg in ASYMMETRIC_ALGORITHMS:
            kid = header.get("kid")
            if self.jwks is None:
                raise InvalidToken("asymmetric access tokens need SUPABASE_URL (JWKS)")
            if not isinstance(kid, str) or not kid:
                raise InvalidToken("the access token names no signing key")
            jwk = await self.jwks.get(kid)
            if jwk is None:
                raise InvalidToken("the access token is signed with an unknown key")
            if jwk.key_type != ASYMMETRIC_ALGORITHMS[alg] or (jwk.algorithm_name or alg) != alg:
                raise InvalidToken("the access token's algorithm does not match its key")
            key = jwk.key
        else:
            raise InvalidToken("the access token's algorithm is not accepted")
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: Any, alg: str) -> User:
        options = {"require": ["exp", "sub", "aud"], "verify_iat": True}
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=AUDIENCE, issuer=self.issuer,
                leeway=self.leeway, options=options,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("the access token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("the access token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the access token's signature is invalid") from None
        except PyJWTError:
            raise InvalidToken("the access token is invalid") from None
        if claims.get("role") != USER_ROLE:
            raise InvalidToken("the access token is not a signed-in user's")
        sub = claims.get("sub")
        try:
            user_id = str(uuid.UUID(sub)) if isinstance(sub, str) else None
        except ValueError:
            user_id = None
        if user_id is None:
            raise InvalidToken("the access token's subject is not a user id")
        metadata = claims.get("user_metadata")
        return User(
            id=user_id,
            role=USER_ROLE,
            email=claims.get("email") if isinstance(claims.get("email"), str) else None,
            phone=claims.get("phone") if isinstance(claims.get("phone"), str) else None,
            is_anonymous=claims.get("is_anonymous") is True,
            session_id=claims.get("session_id") if isinstance(claims.get("session_id"), str) else None,
            user_metadata=metadata if isinstance(metadata, dict) else {},
            claims=claims,
        )


# ---- development tokens (`callflow dev-token`) ---------------------------------------------------

LOCAL_SUPABASE_URL = "http://127.0.0.1:54321"  # the Supabase CLI's local API


def dev_access_token(settings, user_id: str, *, email: str | None = None,
                     user_metadata: dict[str, Any] | None = None, ttl_seconds: int = 3600) -> str:
    """A user access token shaped like Supabase's, signed HS256 with the development secret.

    Only where the development defaults apply (`Settings.development_defaults_allowed`: not
    production, SUPABASE_URL unset or loopback); refused with RuntimeError anywhere else.
    """
    refusal = settings.development_defaults_refusal("a development token")
    if refusal:
        raise RuntimeError(refusal)
    secret = settings.jwt_secret()
    if not secret:
        raise RuntimeError("SUPABASE_JWT_SECRET is not set")
    user_id = str(uuid.UUID(user_id))
    now = int(time.time())
    claims = {
        "iss": issuer_for(settings.supabase_url or LOCAL_SUPABASE_URL),
        "aud": AUDIENCE,
        "exp": now + ttl_seconds,
        "iat": now,
        "sub": user_id,
        "email": email or "",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": user_metadata or {},
        "role": USER_ROLE,
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "JWT"})
