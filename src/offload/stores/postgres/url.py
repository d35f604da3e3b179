"""The `postgresql://` URL: offload's own options, what goes to libpq, and the URL shown.

    postgresql://user[:password]@host[:port]/database?schema=offload&lease_timeout=60&create=true

`schema`, `lease_timeout` and `create` are offload's; every other query parameter
(`sslmode`, `connect_timeout`, `application_name`, ...) is libpq's and goes to it as
written, checked by libpq's own parser now, not at the first connection. Credentials are
libpq's business too: the URL's password, PGPASSWORD, ~/.pgpass, a service file. The
password is kept only in the connection string handed to libpq; `shown` (what `url`,
reprs, log lines and errors say) has it as `***`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..._redact import REDACTED, join_dsn, redact_dsn
from .._shared import bool_option, number_option

__all__ = ["SCHEMES", "PostgresUrl", "parse_postgres_url"]

SCHEMES = ("postgresql", "postgres")
_OURS = ("schema", "lease_timeout", "create")
# A schema name offload writes into its SQL (quoted): PostgreSQL's plain identifiers.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# libpq waits forever for an unreachable host unless told otherwise; an enqueue must not.
DEFAULT_CONNECT_TIMEOUT = "10"
# A connection that dies without a word (a NAT's idle timeout, a host gone) is noticed in
# about a minute when idle (TCP keepalives) and within 30 s of unanswered data (Linux's
# TCP_USER_TIMEOUT), not the kernel's quarter of an hour: a statement stuck on it holds the
# store's lock, and the leases it should renew would lapse. A URL's own values win.
DEFAULT_TCP = (
    ("keepalives", "1"),
    ("keepalives_idle", "30"),
    ("keepalives_interval", "10"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
)


@dataclass(frozen=True)
class PostgresUrl:
    """A parsed `postgresql://` URL. `conninfo` holds the password: never show it."""

    shown: str
    conninfo: str = field(repr=False)
    password: str | None = field(repr=False)
    schema: str = "offload"
    lease_timeout: float | None = None
    create: bool = True


def parse_postgres_url(url: str) -> PostgresUrl:
    """The parts of a `postgresql://` (or `postgres://`) URL; ValueError naming what is
    wrong, and never the password."""
    shown = redact_dsn(url)
    try:
        split = urlsplit(url)
    except ValueError:
        raise ValueError(f"store: not a valid URL: {shown!r}") from None
    if split.scheme.lower() not in SCHEMES:
        raise ValueError(f"store: not a postgresql:// URL: {shown!r}")
    if split.fragment:
        raise ValueError(
            f"store: {shown!r} has a #fragment; a database URL takes none{_hint(split.fragment)}"
        )
    try:
        pairs = parse_qsl(split.query, keep_blank_values=True, strict_parsing=bool(split.query))
    except ValueError:
        raise ValueError(
            f"store: {shown!r} has a malformed query string{_hint(split.query)}"
        ) from None
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in pairs:
        if name in _OURS:
            if name in ours:
                raise ValueError(f"store: {shown!r} gives {name} twice")
            ours[name] = value
        else:
            theirs.append((name, value))
    schema = ours.get("schema", "offload")
    if not _IDENTIFIER.match(schema):
        raise ValueError(
            f"store: postgresql URL option schema= must be a plain identifier (letters, "
            f"digits, _; at most 63), got {schema!r}"
        )
    lease_timeout = None
    if "lease_timeout" in ours:
        lease_timeout = number_option(
            "postgresql", "lease_timeout", ours["lease_timeout"], minimum=0, above=True
        )
    create = bool_option("postgresql", "create", ours["create"]) if "create" in ours else True
    given = {name for name, _ in theirs}
    for name, value in (("connect_timeout", DEFAULT_CONNECT_TIMEOUT), *DEFAULT_TCP):
        if name not in given:
            theirs.append((name, value))
    conninfo = join_dsn(split.scheme, split.netloc, split.path, urlencode(theirs))
    password = _check_with_libpq(conninfo, shown, split.password)
    return PostgresUrl(
        shown=shown,
        conninfo=conninfo,
        password=password,
        schema=schema,
        lease_timeout=lease_timeout,
        create=create,
    )


def _hint(part: str) -> str:
    """What to say when a `#` or `?` that cut the URL short came from its password."""
    if "@" not in part:
        return ""
    return " (a '#' or '?' in the password must be percent-encoded: %23, %3F)"


def _check_with_libpq(conninfo: str, shown: str, raw_password: str | None) -> str | None:
    """Let libpq parse the connection string now (an unknown parameter, a bad port); the
    password it holds, if any."""
    try:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - an optional extra
    except ImportError:
        raise ValueError(
            "store: the PostgreSQL store needs psycopg 3: pip install 'offload[postgres]'"
        ) from None
    try:
        params = conninfo_to_dict(conninfo)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's own message
        message = str(exc).replace(conninfo, shown)
        if raw_password:
            message = message.replace(raw_password, REDACTED)
        raise ValueError(f"store: {shown!r}: {message}") from None
    password = params.get("password")
    return str(password) if password else None
