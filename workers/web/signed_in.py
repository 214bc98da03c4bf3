"""Who is calling an `/api/` route: the Supabase access token, verified as the token route does."""

from __future__ import annotations

from starlette.requests import Request

from config.logging import get_logger
from config.settings import get_settings
from orchestration.auth import AuthUnavailable, InvalidToken, SupabaseTokenVerifier, User
from workers.web.errors import ApiError

log = get_logger("callflow.web.auth")

_verifier: SupabaseTokenVerifier | None = None


def _get_verifier() -> SupabaseTokenVerifier:
    global _verifier
    if _verifier is None:
        _verifier = SupabaseTokenVerifier.from_settings(get_settings())
    return _verifier


async def signed_in_user(request: Request, *, query_token: bool = False) -> User:
    """The user of `Authorization: Bearer <token>` (or `?access_token=` where EventSource needs it).

    Raises ApiError 401 / 503. The token never reaches a log or an answer.
    """
    scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
    credentials = credentials.strip() if scheme.lower() == "bearer" else ""
    if not credentials and query_token:
        credentials = request.query_params.get("access_token", "").strip()
    if not credentials:
        raise ApiError(401, "unauthorized", "an Authorization: Bearer <Supabase access token> header is required",
                       headers={"WWW-Authenticate": 'Bearer realm="callflow"'})
    try:
        return await _get_verifier().verify(credentials)
    except InvalidToken as exc:
        log.info("api request refused", reason=str(exc), path=request.url.path)
        raise ApiError(401, "unauthorized", str(exc),
                       headers={"WWW-Authenticate": 'Bearer realm="callflow", error="invalid_token"'}) from None
    except AuthUnavailable:
        raise ApiError(503, "unavailable", "the signing keys cannot be fetched; try again",
                       headers={"Retry-After": "5"}) from None
