"""HTTP authentication: ``[http] tokens`` maps user names to tokens.

* ``Authorization: Bearer <token>`` — any user's token;
* ``Authorization: Basic base64(user:token)`` — the token of that user (browsers, curl ``-u``).

Every path but the open ones (``/healthz``) needs one when tokens are configured; with no tokens
the API is open (for loopback use only: ``segnode serve`` refuses to listen elsewhere without them).
Tokens are compared in constant time; the user name is put in ``scope["state"]["user"]``, its role
in ``scope["state"]["role"]``.

Two roles. ``[http] tokens`` are users (the API, the pages, STOW-RS). ``[http] worker_tokens`` are
remote workers: they may use ``/api/worker/...`` and nothing else, and those routes take no other
role (403 either way; the routes themselves check that a worker holds the job it asks about).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz"})
#: The remote workers' routes (:mod:`node.web.workers`): worker tokens only.
WORKER_PREFIX = "/api/worker/"
USER, WORKER = "user", "worker"
CHALLENGE = b'Basic realm="segnode", Bearer realm="segnode"'


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def authenticate(authorization: str, tokens: dict[str, SecretStr]) -> str | None:
    """The user an ``Authorization`` header value proves, or None."""
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        user = None
        for name, token in tokens.items():  # no early exit: the same time for every user
            if _same(credentials, token.get_secret_value()) and user is None:
                user = name
        return user
    if scheme.lower() == "basic" and credentials:
        try:
            name, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        token = tokens.get(name)
        if sep and token is not None and _same(password, token.get_secret_value()):
            return name
    return None


def authenticate_role(authorization: str, tokens: dict[str, SecretStr],
                      worker_tokens: dict[str, SecretStr]) -> tuple[str, str] | None:
    """``(name, role)`` an ``Authorization`` header value proves, or None. Both tables are always
    searched (the same time whichever matches)."""
    user = authenticate(authorization, tokens)
    worker = authenticate(authorization, worker_tokens)
    if user is not None:
        return user, USER
    if worker is not None:
        return worker, WORKER
    return None


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", CHALLENGE))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TokenAuth:
    """ASGI middleware: 401 with a challenge unless the request proves a configured user or worker;
    403 when the role does not fit the path (a worker outside ``/api/worker/``, anyone else inside)."""

    def __init__(self, app: ASGIApp, tokens: dict[str, SecretStr], open_paths: frozenset[str] = OPEN_PATHS,
                 worker_tokens: dict[str, SecretStr] | None = None):
        self.app, self.tokens, self.open_paths = app, tokens, open_paths
        self.worker_tokens = worker_tokens or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        worker_path = scope["path"].startswith(WORKER_PREFIX)
        if not self.tokens and not self.worker_tokens:
            if worker_path:  # an open API (loopback) still has no anonymous workers
                await _refuse(send, 403, "no worker tokens are configured ([http] worker_tokens)")
                return
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        proved = authenticate_role(header, self.tokens, self.worker_tokens) if header else None
        if proved is None:
            log.info("HTTP %s %s: 401 (%s)", scope["method"], scope["path"],
                     "bad credentials" if header else "no credentials")
            await _refuse(send, 401, "authentication required")
            return
        name, role = proved
        if worker_path != (role == WORKER):
            log.info("HTTP %s %s: 403 (%s %s)", scope["method"], scope["path"], role, name)
            await _refuse(send, 403, "worker tokens may only use /api/worker/ routes" if role == WORKER
                          else "/api/worker/ routes need a worker token")
            return
        state = scope.setdefault("state", {})
        state["user"], state["role"] = name, role
        await self.app(scope, receive, send)
