"""HTTP authentication: ``[http] tokens`` maps user names to tokens.

* ``Authorization: Bearer <token>`` — any user's token;
* ``Authorization: Basic base64(user:token)`` — the token of that user (browsers, curl ``-u``).

Every path but the open ones (``/healthz``) needs one when tokens are configured; with no tokens
the API is open (for loopback use only: ``segnode serve`` refuses to listen elsewhere without them).
Tokens are compared in constant time; the user name is put in ``scope["state"]["user"]``.
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


class TokenAuth:
    """ASGI middleware: 401 with a challenge unless the request proves a configured user."""

    def __init__(self, app: ASGIApp, tokens: dict[str, SecretStr], open_paths: frozenset[str] = OPEN_PATHS):
        self.app, self.tokens, self.open_paths = app, tokens, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        user = authenticate(header, self.tokens) if header else None
        if user is None:
            log.info("HTTP %s %s: 401 (%s)", scope["method"], scope["path"],
                     "bad credentials" if header else "no credentials")
            body = json.dumps({"error": "authentication required"}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", CHALLENGE)]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)
