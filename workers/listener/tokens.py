"""The access token the Realtime source joins with, refreshed before it expires.

`SUPABASE_SERVICE_ROLE_KEY` is either a JWT (legacy keys; `exp` years ahead) or an opaque
`sb_secret_...` key. When it is a JWT signed with `SUPABASE_JWT_SECRET` (HS256), the listener
mints short-lived tokens with the same claims and hands a fresh one to the channel (`access_token`
push) well before the previous one expires, so the server never shuts the channel for an expired
token. Otherwise the key is used as is; a JWT key that has already expired is a configuration
error (one line, exit 2), and one that expires within a day is logged as a warning.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from config.settings import ConfigurationError


class TokenProvider:
    def __init__(self, key: str, jwt_secret: str | None, ttl_seconds: float = 3600.0) -> None:
        self.key = key
        self.ttl = max(2.0, float(ttl_seconds))
        self.claims: dict[str, Any] | None = None
        self.can_mint = False
        self._token: str | None = None
        self._exp: float | None = None
        try:
            self.claims = jwt.decode(key, options={"verify_signature": False, "verify_exp": False})
        except jwt.PyJWTError:
            self.claims = None
        if self.claims is not None and jwt_secret:
            try:
                jwt.decode(key, jwt_secret, algorithms=["HS256"],
                           options={"verify_exp": False, "verify_aud": False, "verify_iss": False})
                self.can_mint = True
                self._secret = jwt_secret
            except jwt.PyJWTError:
                self.can_mint = False
        key_exp = (self.claims or {}).get("exp")
        if isinstance(key_exp, (int, float)) and not self.can_mint and key_exp <= time.time():
            raise ConfigurationError("SUPABASE_SERVICE_ROLE_KEY has expired")

    @property
    def key_expires_soon(self) -> bool:
        exp = (self.claims or {}).get("exp")
        return isinstance(exp, (int, float)) and not self.can_mint and exp - time.time() < 24 * 3600

    def current(self) -> str:
        if not self.can_mint:
            return self.key
        now = time.time()
        if self._token is None or self._exp is None or self._exp - now < self.ttl * 0.35:
            claims = dict(self.claims or {})
            exp = int(now + self.ttl)  # whole seconds: the refresh is timed from this, not from now + ttl
            claims.update(iat=int(now), exp=exp)
            self._token = jwt.encode(claims, self._secret, algorithm="HS256")
            self._exp = float(exp)
        return self._token

    def refresh_in(self) -> float | None:
        """Seconds until the token should be replaced (None: never, the key is used as is)."""
        if not self.can_mint or self._exp is None:
            return None
        return max(1.0, (self._exp - time.time()) - self.ttl * 0.3)
