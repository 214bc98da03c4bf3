"""OpenAPI for the `/api/calls` routes, merged into `token.OPENAPI` (served at `/openapi.json`)."""

from __future__ import annotations

from typing import Any

from workers.web.errors import CODES


# One user's requests hold at most 3 of a web process's API connections (workers/web/call_store.py).
_OVER_SHARE = "`rate_limited`: 3 of your requests are already waiting on the database; retry (`Retry-After`)"


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_AUTH = [{"supabaseAccessToken": []}]
_INVITATION = {"$ref": "#/components/schemas/Invitation"}

PATHS: dict[str, Any] = {
    "/api/calls": {
        "post": {
            "operationId": "startCall", "summary": "Start a call: invite one or more users", "security": _AUTH,
            "description": "The invitations are inserted as you (RLS and the database's rules), all or none. "
                           "Without `room_name` an unguessable one is made.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["callee_ids"],
                "properties": {"callee_ids": {"type": "array", "minItems": 1, "maxItems": 20,
                                              "items": {"type": "string", "format": "uuid"}},
                               "call_type": {"type": "string", "enum": ["audio", "video"], "default": "video"},
                               "room_name": {"type": "string", "minLength": 1, "maxLength": 256}}}}}},
            "responses": {
                "201": {"description": "The invitations", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["room_name", "invitations"],
                    "properties": {"room_name": {"type": "string"},
                                   "invitations": {"type": "array", "minItems": 1, "items": _INVITATION}}}}},
                        "links": {action: {"operationId": "moveInvitation", "parameters": {
                            "invitation_id": "$response.body#/invitations/0/id", "action": action}}
                            for action in ("cancel", "accept", "decline")}},
                "401": _error("No or bad access token"),
                "403": _error("`anonymous`: anonymous users may not invite; `forbidden`: refused by RLS"),
                "409": _error("`room_in_use`: the room has other parties; `already_invited`: that callee is "
                              "already being rung in that room"),
                "422": _error("Malformed body; `field` names it"),
                "429": _error("`rate_limited`: over CALLFLOW_INVITE_RATE_PER_MINUTE"),
            },
        },
        "get": {
            "operationId": "listCalls", "summary": "Your recent calls, newest first, with their invitations",
            "security": _AUTH,
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 100, "default": 20}}],
            "responses": {"200": {"description": "Your calls, each its `calls` row and its invitations",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "required": ["calls"], "additionalProperties": False,
                                      "properties": {"calls": {"type": "array", "maxItems": 100,
                                                               "items": {"$ref": "#/components/schemas/Call"}}}}}}},
                          "401": _error("No or bad access token"), "422": _error("Bad limit"),
                          "429": _error(_OVER_SHARE)},
        },
    },
    "/api/calls/{invitation_id}/{action}": {
        "post": {
            "operationId": "moveInvitation", "summary": "Accept or decline (callee), cancel (caller)",
            "security": _AUTH,
            "parameters": [
                {"name": "invitation_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
                {"name": "action", "in": "path", "required": True,
                 "schema": {"type": "string", "enum": ["accept", "decline", "cancel"]}}],
            "responses": {"200": {"description": "The invitation",
                                  "content": {"application/json": {"schema": _INVITATION}}},
                          "401": _error("No or bad access token"), "403": _error("Not yours, or not your move"),
                          "404": _error("No such invitation"), "422": _error("invitation_id is not a UUID"),
                          "409": _error("`conflict`: its status no longer allows it"),
                          "429": _error(_OVER_SHARE)},
        },
    },
    "/api/calls/events": {
        "get": {
            "operationId": "callEvents", "summary": "Server-Sent Events of your invitations and calls",
            "description": "On connect one `invitation` event per live invitation, then an `invitation` event per "
                           "change of one of yours and a `call` event per change of one of your calls; `data` is "
                           "the row as JSON. Heartbeats are comments. EventSource sets no headers: the token may "
                           "come as `?access_token=`.",
            "security": _AUTH,
            "parameters": [{"name": "access_token", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The stream", "content": {"text/event-stream": {}}},
                          "401": _error("No or bad access token"),
                          "429": _error("`rate_limited`: over CALLFLOW_STREAMS_PER_USER open streams")},
        },
    },
    "/api/dev/users": {"get": {"operationId": "devUsers", "summary": "Development only: the local users",
                               "responses": {"200": {"description": "`{\"users\": [{id, email, name}]}`"},
                                             "404": _error("In production, with a non-loopback SUPABASE_URL, "
                                                           "or to a client that is not loopback")}}},
    "/api/dev/session": {"post": {
        "operationId": "devSession", "summary": "Development only: an access token for a local user",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["user_id"], "properties": {"user_id": {"type": "string", "format": "uuid"}}}}}},
        "responses": {"200": {"description": "`{\"access_token\"}`"}, "404": _error("No such user, or as /api/dev/users"),
                      "422": _error("Malformed body")}}},
}

_TEXT = {"type": "string"}
_MAYBE_TEXT = {"type": "string", "nullable": True}

INVITATION_SCHEMA: dict[str, Any] = {
    "type": "object", "description": "A `call_invitations` row.",
    "required": ["id", "room_name", "caller_id", "callee_id", "call_type", "status", "created_at"],
    "properties": {name: _TEXT for name in (
        "id", "room_name", "caller_id", "callee_id", "call_type", "status", "created_at", "updated_at")}
    | {name: _MAYBE_TEXT for name in ("call_id", "ringing_at", "ring_deadline", "answered_at", "ended_at",
                                      "end_reason")}
    | {"metadata": {"type": "object"},
       "status_by": {"type": "string", "enum": ["client", "worker"],
                     "description": "Who made the last status change (written by the database)."}},
}

CALL_SCHEMA: dict[str, Any] = {
    "type": "object", "description": "A `calls` row, with the invitations that led to it.",
    "required": ["id", "room_name", "status", "invitations"],
    "properties": {name: _TEXT for name in ("id", "room_name", "call_type", "status", "created_at")}
    | {name: _MAYBE_TEXT for name in ("caller_id", "livekit_room_sid", "started_at", "ended_at", "end_reason")}
    | {"duration_seconds": {"type": "integer"}, "invitations": {"type": "array", "items": _INVITATION}},
}

# The 200s of the development routes (`workers/web/dev.py`).
_DEV_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/dev/users", "get"): {
        "type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string", "format": "uuid"}, "email": _MAYBE_TEXT, "name": _MAYBE_TEXT}}}}},
    ("/api/dev/session", "post"): {
        "type": "object", "required": ["access_token", "user_id", "expires_in"],
        "properties": {"access_token": _TEXT, "user_id": {"type": "string", "format": "uuid"},
                       "expires_in": {"type": "integer", "minimum": 1}}},
}


def _complete() -> None:
    """The dev routes' 200 bodies; the errors every route may answer."""
    for (path, method), schema in _DEV_BODIES.items():
        PATHS[path][method]["responses"]["200"]["content"] = {"application/json": {"schema": schema}}
    for path, operations in PATHS.items():
        for method, operation in operations.items():
            operation["responses"].setdefault("503", _error("The database is unavailable; retry (`Retry-After`)"))
            if method == "post":
                operation["responses"].setdefault("413", _error("The body is larger than 16 KiB"))
                operation["responses"].setdefault("422", _error("Malformed body; `field` names it"))


_complete()


def extend(openapi: dict[str, Any]) -> dict[str, Any]:
    openapi["paths"].update(PATHS)
    openapi["components"]["schemas"]["Invitation"] = INVITATION_SCHEMA
    openapi["components"]["schemas"]["Call"] = CALL_SCHEMA
    # The contract's error, exactly: `{"error": {"code", "message", "field"?}}` and nothing more.
    error = openapi["components"]["schemas"]["Error"]
    error["additionalProperties"] = False
    error["properties"]["error"]["additionalProperties"] = False
    error["properties"]["error"]["properties"]["code"]["enum"] = list(CODES)
    openapi["info"]["description"] = ("Join tokens, calls and their event stream for the signed-in user. Errors are "
                                      'JSON `{"error": {"code", "message", "field"}}` (`field` only on 422); they '
                                      "never echo tokens.")
    return openapi
