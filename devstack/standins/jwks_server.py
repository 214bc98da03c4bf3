"""A stand-in for Supabase Auth's JWKS endpoint, with real ES256 and RS256 keys.

`JWKSServer` serves `{url}/auth/v1/.well-known/jwks.json` from a background thread (reachable by
subprocesses too), and signs access tokens shaped like Supabase's with any of its keys. Keys can
be added, made current and removed (rotation); `requests` counts the JWKS fetches.

    with JWKSServer() as auth:
        es = auth.add_key("ES256")
        token = auth.sign(user_id, kid=es.kid)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

JWKS_PATH = "/auth/v1/.well-known/jwks.json"


@dataclass
class SigningKey:
    kid: str
    alg: str  # ES256 | RS256
    private_key: Any

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        algo = ECAlgorithm if self.alg == "ES256" else RSAAlgorithm
        jwk = algo.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return jwk

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_key(alg: str, kid: str | None = None) -> SigningKey:
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(alg)
    return SigningKey(kid=kid or str(uuid.uuid4()), alg=alg, private_key=private)


def supabase_claims(user_id: str, issuer: str, *, ttl: int = 3600, now: int | None = None, **overrides) -> dict:
    """The claims Supabase Auth puts in a user's access token."""
    now = int(time.time()) if now is None else now
    claims = {
        "iss": issuer,
        "sub": user_id,
        "aud": "authenticated",
        "exp": now + ttl,
        "iat": now,
        "email": f"user-{user_id[:8]}@example.test",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"email_verified": True},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()
DROP = _DROP  # pass as a claim value to leave the claim out


class JWKSServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.keys: dict[str, SigningKey] = {}
        self.published: list[str] = []  # kids in the JWKS document, in order
        self.requests = 0
        self.fail = False  # answer 503 while set
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] != JWKS_PATH:
                    self.send_error(404)
                    return
                server.requests += 1
                if server.fail:
                    self.send_error(503)
                    return
                body = json.dumps({"keys": [server.keys[k].public_jwk() for k in server.published]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    @property
    def url(self) -> str:
        """Stands for SUPABASE_URL."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/auth/v1"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}{JWKS_PATH}"

    def start(self) -> "JWKSServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="jwks-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "JWKSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- keys ----
    def add_key(self, alg: str = "ES256", publish: bool = True) -> SigningKey:
        key = new_key(alg)
        self.keys[key.kid] = key
        if publish:
            self.published.append(key.kid)
        return key

    def rotate(self, alg: str = "ES256", revoke_old: bool = False) -> SigningKey:
        """A new key, published; with `revoke_old` the previous ones leave the JWKS."""
        if revoke_old:
            self.published.clear()
        return self.add_key(alg)

    def revoke(self, kid: str) -> None:
        self.published.remove(kid)

    # ---- tokens ----
    def sign(self, user_id: str, *, kid: str, headers: dict | None = None, **claims) -> str:
        key = self.keys[kid]
        return jwt.encode(supabase_claims(user_id, self.issuer, **claims), key.private_key, algorithm=key.alg,
                          headers={"kid": kid, "typ": "JWT", **(headers or {})})
