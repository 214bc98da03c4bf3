"""Webhook signature checks, signed with the real SDK (livekit-api `AccessToken.with_sha256`).

`WebhookVerifier` reads `iss` before it knows the secret and does PyJWT's checks in one pass; the
last tests hold it side by side with PyJWT's `jwt.decode` on generated tokens.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.api import AccessToken

from orchestration.webhooks import Unauthorized, WebhookVerifier, body_sha256

KEY, SECRET = "devkey", "devsecret-devsecret-devsecret-0001"
OLD_KEY, OLD_SECRET = "oldkey", "oldsecret-oldsecret-oldsecret-0002"
BODY = b'{"event":"room_started","id":"EV_1","room":{"sid":"RM_1","name":"r"}}'


def sdk_token(body: bytes = BODY, key: str = KEY, secret: str = SECRET, ttl: timedelta | None = None) -> str:
    token = AccessToken(key, secret).with_sha256(body_sha256(body))
    if ttl is not None:
        token = token.with_ttl(ttl)
    return token.to_jwt()


@pytest.fixture
def verifier() -> WebhookVerifier:
    return WebhookVerifier({KEY: SECRET, OLD_KEY: OLD_SECRET})


def reason(verifier: WebhookVerifier, authorization, body: bytes = BODY) -> str | None:
    try:
        verifier.verify(authorization, body)
    except Unauthorized as exc:
        assert exc.status == 401 and exc.code == "unauthorized"
        return exc.reason
    return None


def test_sdk_signed_webhook_verifies(verifier):
    claims = verifier.verify(sdk_token(), BODY)
    assert claims["iss"] == KEY and claims["sha256"] == body_sha256(BODY)


def test_header_as_bytes_and_with_bearer_prefix_are_accepted(verifier):
    token = sdk_token()
    assert reason(verifier, token.encode()) is None
    # LiveKit sends the bare JWT; a Bearer prefix changes nothing about what must verify.
    assert reason(verifier, f"Bearer {token}") is None
    assert reason(verifier, f"bearer  {token}") is None


def test_rotation_key_is_accepted(verifier):
    assert reason(verifier, sdk_token(key=OLD_KEY, secret=OLD_SECRET)) is None


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer ", b""])
def test_unsigned(verifier, header):
    assert reason(verifier, header) == "unsigned"


def test_unknown_key(verifier):
    assert reason(verifier, sdk_token(key="stranger", secret=SECRET)) == "unknown_key"


def test_bad_signature_known_key_wrong_secret(verifier):
    assert reason(verifier, sdk_token(secret="not-the-secret-not-the-secret-000")) == "bad_signature"


def test_tampered_claims_break_the_signature(verifier):
    header, payload, signature = sdk_token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sha256"] = body_sha256(b"{}")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert reason(verifier, f"{header}.{forged}.{signature}", b"{}") == "bad_signature"


def test_expired(verifier):
    assert reason(verifier, sdk_token(ttl=timedelta(minutes=-5))) == "expired"


def test_within_leeway_is_still_valid(verifier):
    assert reason(verifier, sdk_token(ttl=timedelta(seconds=-20))) is None


def test_not_yet_valid(verifier):
    now = int(time.time())
    token = jwt.encode({"iss": KEY, "nbf": now + 600, "exp": now + 900, "sha256": body_sha256(BODY)}, SECRET,
                       algorithm="HS256")
    assert reason(verifier, token) == "not_yet_valid"


def test_body_hash_mismatch(verifier):
    assert reason(verifier, sdk_token(), BODY + b" ") == "hash_mismatch"
    assert reason(verifier, sdk_token(body=b"other"), BODY) == "hash_mismatch"


def test_token_without_body_hash(verifier):
    token = AccessToken(KEY, SECRET).to_jwt()
    assert reason(verifier, token) == "hash_mismatch"


def test_token_without_exp_is_refused(verifier):
    token = jwt.encode({"iss": KEY, "sha256": body_sha256(BODY)}, SECRET, algorithm="HS256")
    assert reason(verifier, token) == "malformed_token"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_algorithms_are_refused(verifier, algorithm):
    now = int(time.time())
    token = jwt.encode({"iss": KEY, "exp": now + 300, "sha256": body_sha256(BODY)}, SECRET, algorithm=algorithm)
    assert reason(verifier, token) == "bad_signature"


def test_alg_none_is_refused(verifier):
    now = int(time.time())
    token = jwt.encode({"iss": KEY, "exp": now + 300, "sha256": body_sha256(BODY)}, None, algorithm="none")
    assert reason(verifier, token) in ("bad_signature", "malformed_token")


@pytest.mark.parametrize("garbage", ["abc", "a.b", "a.b.c.d", "!!!.???.***", "eyJhbGciOiJIUzI1NiJ9.e30=.x",
                                     "é.é.é"])
def test_malformed_tokens(verifier, garbage):
    assert reason(verifier, garbage) in ("malformed_token", "bad_signature")


def test_hash_comparison_is_constant_time():
    import inspect

    from orchestration import webhooks

    assert "compare_digest" in inspect.getsource(webhooks.WebhookVerifier.check_body)


# ---- side by side with PyJWT ------------------------------------------------------------------------

def pyjwt_verdict(token: str, keys: dict[str, str], leeway: float = 60) -> bool:
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        secret = keys.get(iss) if isinstance(iss, str) else None
        if secret is None:
            return False
        jwt.decode(token, key=secret, algorithms=["HS256"], issuer=iss, leeway=leeway,
                   options={"require": ["exp", "iss"]})
        return True
    except jwt.InvalidTokenError:
        return False


claims_strategy = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from([KEY, OLD_KEY, "stranger", "", 7]),
        "exp": st.one_of(st.integers(-4000, 4000).map(lambda d: int(time.time()) + d), st.just("soon"),
                         st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(
                             lambda d: time.time() + d)),
        "nbf": st.integers(-4000, 4000).map(lambda d: int(time.time()) + d),
        "iat": st.integers(-4000, 4000).map(lambda d: int(time.time()) + d),
        "sub": st.text(max_size=8),
        "sha256": st.just(body_sha256(BODY)),
    },
)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@settings(max_examples=300, deadline=None)
@given(claims=claims_strategy, algorithm=st.sampled_from(["HS256", "HS256", "HS512"]),
       secret=st.sampled_from([SECRET, OLD_SECRET, "wrong-secret-wrong-secret-wrong-00"]),
       tamper=st.sampled_from([None, "signature", "payload"]))
def test_same_verdict_as_pyjwt(claims, algorithm, secret, tamper):
    keys = {KEY: SECRET, OLD_KEY: OLD_SECRET}
    token = jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), secret, algorithm=algorithm)
    header, payload, signature = token.split(".")
    if tamper == "signature":
        signature = ("A" if signature[0] != "A" else "B") + signature[1:]
    elif tamper == "payload":
        payload = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    token = f"{header}.{payload}.{signature}"
    mine = WebhookVerifier(keys)
    try:
        mine.verify_token(token)
        ours = True
    except Unauthorized:
        ours = False
    assert ours == pyjwt_verdict(token, keys), (claims, algorithm, tamper)
