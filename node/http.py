"""The one way segnode makes an HTTP client session (fetch from Orthanc, STOW-RS outbox, viewer proxy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr


def http_session(
    username: str = "",
    password: str = "",
    token: str = "",
    verify_tls: bool = True,
    ca_bundle: Path | None = None,
) -> Any:
    """A ``requests`` session with basic or bearer authentication and the TLS verification asked for.

    ``requests`` lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` in the environment override a session's
    ``verify`` (psf/requests#3829): a configured CA bundle or ``verify_tls = false`` must win here."""
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if self.verify is not True:
                merged["verify"] = self.verify
            return merged

    session = Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        session.auth = requests.auth.HTTPBasicAuth(username, password)
    session.verify = str(ca_bundle) if ca_bundle else verify_tls
    return session


class HttpAuth(Protocol):
    """What a config section that names an HTTP server carries (``[[destinations]]``, ``[orthanc]``)."""

    username: str
    password: SecretStr
    token: SecretStr
    verify_tls: bool
    ca_bundle: Path | None


def session_for(section: HttpAuth) -> Any:
    """:func:`http_session` with a config section's credentials and TLS settings."""
    return http_session(
        section.username,
        section.password.get_secret_value(),
        section.token.get_secret_value(),
        section.verify_tls,
        section.ca_bundle,
    )
