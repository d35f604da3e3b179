"""Who may use the console, and proof that a POST came from its own page.

Access is a token, an `auth(environ) -> bool` callable, or both (either lets a request in):

- A token is compared in constant time. A browser shows it once (`?token=TOKEN` on any
  page, as Jupyter's printed URL does, or the login form) and gets a session cookie; a
  script sends `Authorization: Bearer TOKEN` on every request and needs no cookie.
- The session cookie is `expires.nonce.signature`, signed with a key derived from the
  token, so every process that serves the console with the same token accepts it (several
  gunicorn workers), and changing the token ends every session. HttpOnly, SameSite=Strict,
  scoped to the console's path, Secure over HTTPS; 12 hours.
- `auth(environ)` is the host application's own check (its login session, a reverse
  proxy's header); an exception it raises counts as "no".

CSRF. Every POST that does not carry the Bearer token must carry a CSRF token, in the
form (`csrf`) or the `X-CSRF-Token` header, and must not come from another site
(`Sec-Fetch-Site`, which browsers send, says `same-site` or `cross-site`); otherwise it
is refused with 403 and changes nothing. The CSRF token is an HMAC of a random nonce kept
in its own HttpOnly, SameSite=Strict cookie: a page of another site can neither read the
cookie nor the token in the console's pages. With a token the HMAC key derives from it;
with `auth=` alone it is fixed (a double-submit cookie, which works across processes).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from .http import Request

__all__ = ["CSRF_COOKIE", "SESSION_COOKIE", "SESSION_SECONDS", "Access"]

log = logging.getLogger("offload")

SESSION_COOKIE = "offload_console_session"
CSRF_COOKIE = "offload_console_csrf"
SESSION_SECONDS = 12 * 3600
_FOREIGN = frozenset({"same-site", "cross-site"})  # Sec-Fetch-Site values refused on POST


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Access:
    """The console's access rules for one app (see the module docstring)."""

    def __init__(
        self,
        token: str | None,
        auth: Callable[[Mapping[str, Any]], bool] | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.auth = auth
        self._clock = clock
        secret = token.encode() if token is not None else b""
        self._session_key = hashlib.sha256(b"offload console session\0" + secret).digest()
        self._csrf_key = hashlib.sha256(b"offload console csrf\0" + secret).digest()

    @property
    def uses_sessions(self) -> bool:
        """True when a browser logs in with the token (and so may log out)."""
        return self.token is not None

    def token_matches(self, candidate: str) -> bool:
        token = self.token
        return token is not None and hmac.compare_digest(candidate.encode(), token.encode())

    def bearer(self, request: Request) -> bool:
        """True when the request carries `Authorization: Bearer TOKEN`."""
        header = request.header("Authorization") or ""
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def allowed(self, request: Request) -> bool:
        """May this request see the console: the Bearer token, a session, or `auth`."""
        if self.bearer(request) or self._session_ok(request.cookies.get(SESSION_COOKIE, "")):
            return True
        if self.auth is None:
            return False
        try:
            return bool(self.auth(request.environ))
        except Exception:
            log.exception("offload console: the auth callable raised; access refused")
            return False

    def new_session(self) -> str:
        """A session cookie's value, valid for SESSION_SECONDS."""
        expires = int(self._clock()) + SESSION_SECONDS
        nonce = secrets.token_urlsafe(12)
        return f"{expires}.{nonce}.{_mac(self._session_key, f'{expires}.{nonce}')}"

    def _session_ok(self, value: str) -> bool:
        if self.token is None or value.count(".") != 2:
            return False
        expires, nonce, signature = value.split(".")
        expected = _mac(self._session_key, f"{expires}.{nonce}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return False
        return expires.isdigit() and int(expires) > self._clock()

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(18)

    def csrf_token(self, nonce: str) -> str:
        """The CSRF token the console's forms carry, for the nonce in the CSRF cookie."""
        return _mac(self._csrf_key, f"csrf:{nonce}")[:40]

    def post_allowed(self, request: Request) -> tuple[bool, str]:
        """(allowed, why not) for a POST: the Bearer token, or same-origin with a CSRF
        token matching the CSRF cookie."""
        if self.bearer(request):
            return True, ""
        site = (request.header("Sec-Fetch-Site") or "").lower()
        if site in _FOREIGN:
            return False, "a request from another site"
        if CSRF_COOKIE in request.repeated_cookies:
            # Another site of a parent domain may have set one: whichever was read, the
            # request cannot be told apart from a forged one.
            return False, "two CSRF cookies (one set by another site of this domain?)"
        nonce = request.cookies.get(CSRF_COOKIE, "")
        sent = request.header("X-CSRF-Token") or request.field("csrf")
        if not nonce or not sent:
            return False, "no CSRF token"
        if not hmac.compare_digest(sent.encode(), self.csrf_token(nonce).encode()):
            return False, "a CSRF token that does not match"
        return True, ""
