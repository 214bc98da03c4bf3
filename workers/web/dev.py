"""Development only: the local users, and a user access token for one of them.

What `callflow dev-token` prints, for the demo page's sign-in where no Supabase Auth runs locally.
Answered only where the development defaults apply (`Settings.development_defaults_allowed`: not
production, SUPABASE_URL unset or loopback) and only to a loopback client; anything else gets the
404 of a missing route.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import get_settings, is_loopback_address
from orchestration.auth import dev_access_token
from workers.web import calls
from workers.web.errors import ApiError

SESSION_TTL_SECONDS = 3600


def _forwarded_for(request: Request) -> list[str]:
    """Every client address a proxy says it forwarded for (X-Forwarded-For, X-Real-IP, Forwarded)."""
    named: list[str] = []
    for value in request.headers.getlist("x-forwarded-for") + request.headers.getlist("x-real-ip"):
        named += [part.strip() for part in value.split(",")]
    for value in request.headers.getlist("forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                key, _, address = pair.strip().partition("=")
                if key.strip().lower() == "for":
                    address = address.strip().strip('"')
                    # `[v6]:port` or `v4:port`; the address is what matters
                    if address.startswith("["):
                        address = address[1:].partition("]")[0]
                    elif address.count(":") == 1:
                        address = address.partition(":")[0]
                    named.append(address)
    return named


def is_local_request(request: Request) -> bool:
    """Whether the request comes from this machine: a loopback peer, forwarded for nobody else.

    The peer is `request.client` (the socket's address, as uvicorn reports it). A forwarding
    header is never trusted to grant access (anyone can send one): it can only take it away. A
    reverse proxy on this machine makes every request it forwards look local, so a request that
    names any client that is not a loopback address (or anything that is not an address, such
    as `unknown` or an obfuscated `_name`) is refused; this is safer than ignoring the headers,
    and still lets a local development proxy (Next.js rewrites: `X-Forwarded-For: 127.0.0.1`)
    through. Known limits (docs/SECURITY.md): a local proxy that adds no such header; and uvicorn
    itself replaces `request.client` with X-Forwarded-For's client when the peer is one of
    FORWARDED_ALLOW_IPS (127.0.0.1 by default), so widening that to remote proxies lets them (and
    whoever they forward) claim 127.0.0.1.
    """
    peer = request.client.host if request.client else None
    return is_loopback_address(peer) and all(is_loopback_address(a) for a in _forwarded_for(request))


def dev_routes_open(request: Request) -> bool:
    return get_settings().development_defaults_allowed and is_local_request(request)


def _development_only(request: Request) -> None:
    if not dev_routes_open(request):
        raise ApiError(404, "not_found", "no such route")


async def dev_users(request: Request) -> Response:
    _development_only(request)
    return JSONResponse({"users": await calls.store().local_users()}, headers={"Cache-Control": "no-store"})


async def dev_session(request: Request) -> Response:
    _development_only(request)
    body = await calls._json_body(request)
    user_id = calls._uuid(body.get("user_id"), "user_id")
    profile = await calls.store().user_profile(user_id)
    if profile is None:
        raise ApiError(404, "not_found", "no such local user")
    token = dev_access_token(get_settings(), user_id, email=profile["email"],
                             user_metadata=profile["raw_user_meta_data"] or {}, ttl_seconds=SESSION_TTL_SECONDS)
    return JSONResponse({"access_token": token, "user_id": user_id, "expires_in": SESSION_TTL_SECONDS},
                        headers={"Cache-Control": "no-store"})


routes: list = [
    Route("/api/dev/users", dev_users, methods=["GET"]),
    Route("/api/dev/session", dev_session, methods=["POST"]),
]
