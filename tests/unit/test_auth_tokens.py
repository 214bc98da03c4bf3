"""Supabase access-token verification against a stand-in JWKS endpoint with real keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest

from config.settings import DEV_SUPABASE_JWT_SECRET, build_settings
from devstack.standins.jwks_server import DROP, JWKSServer, new_key, supabase_claims
from orchestration.auth import (
    AuthUnavailable,
    InvalidToken,
    JWKSCache,
    SupabaseTokenVerifier,
    dev_access_token,
)

SECRET = "legacy-secret-legacy-secret-legacy-secret-0001"


@pytest.fixture(scope="module")
def auth():
    with JWKSServer() as server:
        server.es = server.add_key("ES256")
        server.rs = server.add_key("RS256")
        yield server


def verifier(auth: JWKSServer, **kwargs) -> SupabaseTokenVerifier:
    cache = JWKSCache(auth.jwks_url, min_refetch_interval=kwargs.pop("min_refetch_interval", 0.05),
                      max_age=kwargs.pop("max_age", 600))
    return SupabaseTokenVerifier(supabase_url=auth.url, jwt_secret=kwargs.pop("jwt_secret", SECRET), jwks=cache, **kwargs)


def verify(v: SupabaseTokenVerifier, token: str):
    return asyncio.run(v.verify(token))


def refused(v: SupabaseTokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verify(v, token)
    assert token not in str(info.value)
    return str(info.value)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_raw(header: dict, claims: dict, key: bytes) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def uid() -> str:
    return str(uuid.uuid4())


# ---- accepted -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_asymmetric_supabase_token_is_accepted(auth, alg):
    user = uid()
    kid = auth.es.kid if alg == "ES256" else auth.rs.kid
    token = auth.sign(user, kid=kid, user_metadata={"full_name": "Ada Lovelace"}, email="ada@example.test")
    got = verify(verifier(auth), token)
    assert got.id == user and got.role == "authenticated"
    assert got.email == "ada@example.test" and got.display_name == "Ada Lovelace"


def test_legacy_hs256_token_is_accepted_beside_jwks(auth):
    user = uid()
    token = jwt.encode(supabase_claims(user, auth.issuer), SECRET, algorithm="HS256")
    assert verify(verifier(auth), token).id == user


def test_without_supabase_url_hs256_works_and_issuer_is_not_checked():
    user = uid()
    token = jwt.encode(supabase_claims(user, "http://elsewhere/auth/v1"), SECRET, algorithm="HS256")
    v = SupabaseTokenVerifier(supabase_url=None, jwt_secret=SECRET)
    assert verify(v, token).id == user


def test_dev_token_verifies_and_is_refused_in_production():
    settings = build_settings(callflow_env="development")
    user = uid()
    token = dev_access_token(settings, user, email="d@example.test", user_metadata={"name": "Dev"})
    v = SupabaseTokenVerifier.from_settings(settings)
    got = verify(v, token)
    assert got.id == user and got.display_name == "Dev"
    assert settings.jwt_secret() == DEV_SUPABASE_JWT_SECRET
    prod = build_settings(
        callflow_env="development", supabase_jwt_secret="x" * 40
    ).model_copy(update={"callflow_env": "production"})
    with pytest.raises(RuntimeError):
        dev_access_token(prod, user)


def test_a_dev_secret_token_is_refused_when_supabase_url_is_a_real_project(monkeypatch):
    """CALLFLOW_ENV forgotten, SUPABASE_URL a real project: a token signed with the Supabase CLI's
    published secret (anyone can make one) is not a user's, and no development token is made."""
    monkeypatch.delenv("CALLFLOW_ENV", raising=False)
    monkeypatch.delenv("SUPABASE_JWT_SECRET", raising=False)
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "k" * 40)
    settings = build_settings()
    assert not settings.is_production
    forged = jwt.encode(supabase_claims(uid(), "https://abc.supabase.co/auth/v1"), DEV_SUPABASE_JWT_SECRET,
                        algorithm="HS256", headers={"typ": "JWT"})
    v = SupabaseTokenVerifier.from_settings(settings)
    refused(v, forged)
    assert v.jwt_secret is None and v.jwks is not None
    assert v.jwks.url == "https://abc.supabase.co/auth/v1/.well-known/jwks.json"  # the project's keys
    with pytest.raises(RuntimeError):
        dev_access_token(settings, uid())


# ---- refused ------------------------------------------------------------------------------------

def test_expired_token_is_refused(auth):
    now = int(time.time())
    token = auth.sign(uid(), kid=auth.es.kid, iat=now - 7200, exp=now - 3600)
    assert "expired" in refused(verifier(auth), token)


def test_expired_hs256_token_is_refused(auth):
    now = int(time.time())
    token = jwt.encode(supabase_claims(uid(), auth.issuer, iat=now - 7200, exp=now - 60), SECRET, algorithm="HS256")
    assert "expired" in refused(verifier(auth), token)


@pytest.mark.parametrize("aud", ["anon", "service_role", ["somebody-else"], DROP])
def test_wrong_or_missing_audience_is_refused(auth, aud):
    refused(verifier(auth), auth.sign(uid(), kid=auth.es.kid, aud=aud))


@pytest.mark.parametrize("iss", ["https://evil.example/auth/v1", "http://127.0.0.1:1/auth/v1", DROP])
def test_wrong_or_missing_issuer_is_refused(auth, iss):
    refused(verifier(auth), auth.sign(uid(), kid=auth.rs.kid, iss=iss))


@pytest.mark.parametrize("role", ["anon", "service_role", DROP])
def test_role_other_than_authenticated_is_refused(auth, role):
    refused(verifier(auth), auth.sign(uid(), kid=auth.es.kid, role=role))


@pytest.mark.parametrize("sub", ["not-a-uuid", "", DROP, 42])
def test_subject_must_be_a_user_id(auth, sub):
    claims = supabase_claims(uid(), auth.issuer, sub=sub)
    token = jwt.encode(claims, auth.es.private_key, algorithm="ES256", headers={"kid": auth.es.kid})
    refused(verifier(auth), token)


def test_missing_exp_and_future_iat_are_refused(auth):
    refused(verifier(auth), auth.sign(uid(), kid=auth.es.kid, exp=DROP))
    now = int(time.time())
    refused(verifier(auth), auth.sign(uid(), kid=auth.es.kid, iat=now + 3600, exp=now + 7200))


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_wrong_signature_is_refused(auth, alg):
    published = auth.es if alg == "ES256" else auth.rs
    impostor = new_key(alg)  # same algorithm, not the project's key, claiming the project's kid
    claims = supabase_claims(uid(), auth.issuer)
    token = jwt.encode(claims, impostor.private_key, algorithm=alg, headers={"kid": published.kid})
    assert "signature" in refused(verifier(auth), token)


def test_tampered_payload_is_refused(auth):
    token = auth.sign(uid(), kid=auth.es.kid)
    head, _, sig = token.split(".")
    other = b64(json.dumps(supabase_claims(uid(), auth.issuer)).encode())
    refused(verifier(auth), f"{head}.{other}.{sig}")


def test_hs256_with_a_wrong_secret_is_refused(auth):
    token = jwt.encode(supabase_claims(uid(), auth.issuer), "another-secret-another-secret-0000", algorithm="HS256")
    assert "signature" in refused(verifier(auth), token)


def test_unknown_kid_is_refused_after_one_refetch(auth):
    v = verifier(auth)
    verify(v, auth.sign(uid(), kid=auth.es.kid))
    before = auth.requests
    stray = new_key("ES256")
    claims = supabase_claims(uid(), auth.issuer)
    token = jwt.encode(claims, stray.private_key, algorithm="ES256", headers={"kid": stray.kid})
    assert "unknown key" in refused(v, token)
    assert auth.requests == before + 1


def test_token_without_kid_is_refused(auth):
    token = jwt.encode(supabase_claims(uid(), auth.issuer), auth.es.private_key, algorithm="ES256")
    refused(verifier(auth), token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(auth, alg):
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": auth.es.kid}).encode())
    body = b64(json.dumps(supabase_claims(uid(), auth.issuer)).encode())
    refused(verifier(auth), f"{header}.{body}.")
    refused(verifier(auth), f"{header}.{body}.{b64(b'x')}")


@pytest.mark.parametrize("alg", [["HS256"], ["ES256"], {"alg": "HS256"}, 256, True, None])
def test_an_alg_that_is_no_string_is_refused(auth, alg):
    """A header's `alg` is the sender's JSON: a list or an object is refused, not looked up (unhashable)."""
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": auth.es.kid}).encode())
    body = b64(json.dumps(supabase_claims(uid(), auth.issuer)).encode())
    refused(verifier(auth), f"{header}.{body}.{b64(b'x')}")


@pytest.mark.parametrize("which", ["rs", "es"])
def test_hs_rs_key_confusion_is_refused(auth, which):
    """HS256 'signed' with the project's public key (PEM or JWK JSON) as the HMAC secret."""
    key = getattr(auth, which)
    claims = supabase_claims(uid(), auth.issuer)
    for secret in (key.public_pem(), json.dumps(key.public_jwk()).encode()):
        token = hs256_raw({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims, secret)
        refused(verifier(auth), token)
        # and when no legacy secret is configured at all
        refused(verifier(auth, jwt_secret=None), token)


def test_algorithm_must_match_the_keys_family(auth):
    claims = supabase_claims(uid(), auth.issuer)
    # An RS256 token naming the EC key's kid, and the reverse.
    rs_token = jwt.encode(claims, auth.rs.private_key, algorithm="RS256", headers={"kid": auth.es.kid})
    es_token = jwt.encode(claims, auth.es.private_key, algorithm="ES256", headers={"kid": auth.rs.kid})
    refused(verifier(auth), rs_token)
    refused(verifier(auth), es_token)
    # Algorithms Supabase does not use are refused even with a valid key.
    ps_token = jwt.encode(claims, auth.rs.private_key, algorithm="PS256", headers={"kid": auth.rs.kid})
    refused(verifier(auth), ps_token)


def test_hs256_is_refused_when_no_legacy_secret_is_set(auth):
    token = jwt.encode(supabase_claims(uid(), auth.issuer), SECRET, algorithm="HS256")
    refused(verifier(auth, jwt_secret=None), token)


def test_asymmetric_token_without_supabase_url_is_refused(auth):
    token = auth.sign(uid(), kid=auth.es.kid)
    refused(SupabaseTokenVerifier(supabase_url=None, jwt_secret=SECRET), token)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJFUzI1NiJ9.e30.", "x" * 20000,
                                     "eyJhbGciOiJIUzI1NiJ9.!!!.xyz"])
def test_garbage_is_refused(auth, garbage):
    with pytest.raises(InvalidToken):
        verify(verifier(auth), garbage)


# ---- JWKS cache and rotation ---------------------------------------------------------------------

def test_keys_are_cached(auth):
    v = verifier(auth)
    before = auth.requests

    async def many():
        for _ in range(20):
            await v.verify(auth.sign(uid(), kid=auth.es.kid))
            await v.verify(auth.sign(uid(), kid=auth.rs.kid))

    asyncio.run(many())
    assert auth.requests == before + 1


def test_rotation_new_kid_is_fetched_at_once_and_revoked_key_expires_with_the_cache():
    with JWKSServer() as server:
        old = server.add_key("ES256")
        v = SupabaseTokenVerifier(supabase_url=server.url, jwt_secret=None,
                                  jwks=JWKSCache(server.jwks_url, max_age=0.5, min_refetch_interval=1.0))

        async def scenario():
            user = uid()
            assert (await v.verify(server.sign(user, kid=old.kid))).id == user
            assert server.requests == 1
            new = server.rotate("RS256", revoke_old=True)
            started = time.monotonic()
            assert (await v.verify(server.sign(user, kid=new.kid))).id == user  # no 30 s wait
            assert time.monotonic() - started < 1.5
            assert server.requests == 2
            await asyncio.sleep(0.6)  # cache older than max_age: the revoked key is gone
            with pytest.raises(InvalidToken):
                await v.verify(server.sign(user, kid=old.kid))

        asyncio.run(scenario())


def test_a_flood_of_unknown_kids_costs_few_fetches():
    with JWKSServer() as server:
        key = server.add_key("ES256")
        v = SupabaseTokenVerifier(supabase_url=server.url, jwt_secret=None,
                                  jwks=JWKSCache(server.jwks_url, min_refetch_interval=1.0))
        strays = [new_key("ES256") for _ in range(3)]

        async def attempt(i: int):
            stray = strays[i % 3]
            token = jwt.encode(supabase_claims(uid(), server.issuer), stray.private_key, algorithm="ES256",
                               headers={"kid": f"{stray.kid}-{i}"})
            with pytest.raises(InvalidToken):
                await v.verify(token)

        async def scenario():
            await v.verify(server.sign(uid(), kid=key.kid))
            await asyncio.gather(*(attempt(i) for i in range(50)))

        started = time.monotonic()
        asyncio.run(scenario())
        assert server.requests <= 3, server.requests
        assert time.monotonic() - started < 3


def test_jwks_unreachable_without_cached_keys_is_unavailable_not_unauthorized():
    with JWKSServer() as server:
        key = server.add_key("ES256")
        server.fail = True
        v = SupabaseTokenVerifier(supabase_url=server.url, jwt_secret=None,
                                  jwks=JWKSCache(server.jwks_url, min_refetch_interval=0.01))
        with pytest.raises(AuthUnavailable):
            asyncio.run(v.verify(server.sign(uid(), kid=key.kid)))


def test_stale_keys_are_kept_while_jwks_is_down():
    with JWKSServer() as server:
        key = server.add_key("ES256")
        v = SupabaseTokenVerifier(supabase_url=server.url, jwt_secret=None,
                                  jwks=JWKSCache(server.jwks_url, max_age=0.1, min_refetch_interval=0.01))

        async def scenario():
            await v.verify(server.sign(uid(), kid=key.kid))
            server.fail = True
            await asyncio.sleep(0.2)
            for _ in range(3):
                await v.verify(server.sign(uid(), kid=key.kid))

        asyncio.run(scenario())
